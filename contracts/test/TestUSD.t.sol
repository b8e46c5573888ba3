// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {Base, MockWallet} from "./Base.sol";
import {TestUSD} from "../src/TestUSD.sol";
import {ERC3009} from "@openzeppelin/contracts/token/ERC20/extensions/draft-ERC3009.sol";
import {IERC20Errors} from "@openzeppelin/contracts/interfaces/draft-IERC6093.sol";
import {IERC3009, IERC3009Cancel} from "@openzeppelin/contracts/interfaces/draft-IERC3009.sol";

contract TestUSDTest is Base {
    bytes32 internal constant CANCEL_TYPEHASH = keccak256("CancelAuthorization(address authorizer,bytes32 nonce)");

    function test_decimals_isSix() public view {
        vm.assertEq(token.decimals(), 6, "decimals");
    }

    function test_mint_succeedsForDeployer() public {
        token.mint(signer, 5);
        vm.assertEq(token.balanceOf(signer), 5, "minted");
    }

    function test_mint_revertsForOthers() public {
        vm.prank(payer);
        vm.expectRevert(TestUSD.NotMinter.selector);
        token.mint(payer, 5);
    }

    function test_receiveWithAuthorization_succeedsForRecipient() public {
        bytes memory sig = receiveAuthorization(PAYER_KEY, other, 42, keccak256("n"));
        vm.prank(other);
        token.receiveWithAuthorization(payer, other, 42, 0, type(uint256).max, keccak256("n"), sig);
        vm.assertEq(token.balanceOf(other), 1_000_000e6 + 42, "received");
        vm.assertTrue(token.authorizationState(payer, keccak256("n")), "nonce used");
    }

    function test_receiveWithAuthorization_revertsForOtherCaller() public {
        bytes memory sig = receiveAuthorization(PAYER_KEY, other, 42, keccak256("n"));
        vm.prank(payee);
        vm.expectRevert(abi.encodeWithSelector(IERC20Errors.ERC20InvalidReceiver.selector, other));
        token.receiveWithAuthorization(payer, other, 42, 0, type(uint256).max, keccak256("n"), sig);
    }

    function test_receiveWithAuthorization_revertsOnWrongSigner() public {
        bytes memory sig = receiveAuthorization(OTHER_KEY, other, 42, keccak256("n"));
        vm.prank(other);
        vm.expectRevert(ERC3009.ERC3009InvalidSignature.selector);
        token.receiveWithAuthorization(payer, other, 42, 0, type(uint256).max, keccak256("n"), sig);
    }

    function test_receiveWithAuthorization_revertsWhenExpired() public {
        bytes memory sig = receiveAuthorization(PAYER_KEY, other, 42, keccak256("n"), block.timestamp);
        vm.prank(other);
        vm.expectRevert(abi.encodeWithSelector(ERC3009.ERC3009InvalidAuthorizationTime.selector, 0, block.timestamp));
        token.receiveWithAuthorization(payer, other, 42, 0, block.timestamp, keccak256("n"), sig);
    }

    function test_transferWithAuthorization_succeedsFromAnyCaller() public {
        bytes32 nonce = keccak256("t");
        bytes32 structHash =
            keccak256(abi.encode(TRANSFER_TYPEHASH, payer, signer, uint256(7), uint256(0), type(uint256).max, nonce));
        bytes memory sig = sign(PAYER_KEY, keccak256(abi.encodePacked(hex"1901", tokenDomainSeparator(), structHash)));
        vm.prank(other);
        token.transferWithAuthorization(payer, signer, 7, 0, type(uint256).max, nonce, sig);
        vm.assertEq(token.balanceOf(signer), 7, "transferred");
        vm.expectRevert(abi.encodeWithSelector(ERC3009.ERC3009UsedAuthorization.selector, payer, nonce));
        token.transferWithAuthorization(payer, signer, 7, 0, type(uint256).max, nonce, sig);
    }

    function test_transferWithAuthorization_revertsOnWrongSigner() public {
        bytes32 nonce = keccak256("t");
        bytes memory sig = authorization(TRANSFER_TYPEHASH, OTHER_KEY, signer, 7, 0, type(uint256).max, nonce);
        vm.expectRevert(ERC3009.ERC3009InvalidSignature.selector);
        token.transferWithAuthorization(payer, signer, 7, 0, type(uint256).max, nonce, sig);
        vm.assertEq(token.balanceOf(signer), 0, "nothing moved");
        vm.assertFalse(token.authorizationState(payer, nonce), "nonce unused");
    }

    function test_transferWithAuthorization_revertsOnTamperedValue() public {
        bytes32 nonce = keccak256("t");
        bytes memory sig = authorization(TRANSFER_TYPEHASH, PAYER_KEY, signer, 7, 0, type(uint256).max, nonce);
        vm.expectRevert(ERC3009.ERC3009InvalidSignature.selector);
        token.transferWithAuthorization(payer, signer, 8, 0, type(uint256).max, nonce, sig);
    }

    function test_transferWithAuthorization_revertsOnReceiveAuthorization() public {
        // A ReceiveWithAuthorization signature must not be usable by any caller as a transfer.
        bytes32 nonce = keccak256("t");
        bytes memory sig = receiveAuthorization(PAYER_KEY, signer, 7, nonce);
        vm.expectRevert(ERC3009.ERC3009InvalidSignature.selector);
        token.transferWithAuthorization(payer, signer, 7, 0, type(uint256).max, nonce, sig);
    }

    function test_transferWithAuthorization_revertsWhenExpired() public {
        // validBefore is exclusive: block.timestamp == validBefore is already expired.
        bytes32 nonce = keccak256("t");
        uint256 validBefore = block.timestamp;
        bytes memory sig = authorization(TRANSFER_TYPEHASH, PAYER_KEY, signer, 7, 0, validBefore, nonce);
        vm.expectRevert(abi.encodeWithSelector(ERC3009.ERC3009InvalidAuthorizationTime.selector, 0, validBefore));
        token.transferWithAuthorization(payer, signer, 7, 0, validBefore, nonce, sig);
        vm.assertEq(token.balanceOf(signer), 0, "nothing moved");
        vm.assertFalse(token.authorizationState(payer, nonce), "nonce unused");
    }

    function test_transferWithAuthorization_revertsWhenNotYetValid() public {
        // validAfter is exclusive: block.timestamp == validAfter is not yet valid.
        bytes32 nonce = keccak256("t");
        uint256 validAfter = block.timestamp;
        bytes memory sig =
            authorization(TRANSFER_TYPEHASH, PAYER_KEY, signer, 7, validAfter, type(uint256).max, nonce);
        vm.expectRevert(
            abi.encodeWithSelector(ERC3009.ERC3009InvalidAuthorizationTime.selector, validAfter, type(uint256).max)
        );
        token.transferWithAuthorization(payer, signer, 7, validAfter, type(uint256).max, nonce, sig);
        vm.assertEq(token.balanceOf(signer), 0, "nothing moved");
        vm.assertFalse(token.authorizationState(payer, nonce), "nonce unused");
    }

    function test_transferWithAuthorization_succeedsInsideNarrowestWindow() public {
        // The tightest window that contains now: validAfter = now - 1, validBefore = now + 1.
        bytes32 nonce = keccak256("t");
        uint256 validAfter = block.timestamp - 1;
        uint256 validBefore = block.timestamp + 1;
        bytes memory sig = authorization(TRANSFER_TYPEHASH, PAYER_KEY, signer, 7, validAfter, validBefore, nonce);
        token.transferWithAuthorization(payer, signer, 7, validAfter, validBefore, nonce, sig);
        vm.assertEq(token.balanceOf(signer), 7, "transferred");
    }

    function test_transferWithAuthorization_revertsOnReplay() public {
        bytes32 nonce = keccak256("t");
        bytes memory sig = authorization(TRANSFER_TYPEHASH, PAYER_KEY, signer, 7, 0, type(uint256).max, nonce);
        token.transferWithAuthorization(payer, signer, 7, 0, type(uint256).max, nonce, sig);
        vm.prank(other);
        vm.expectRevert(abi.encodeWithSelector(ERC3009.ERC3009UsedAuthorization.selector, payer, nonce));
        token.transferWithAuthorization(payer, signer, 7, 0, type(uint256).max, nonce, sig);
        vm.assertEq(token.balanceOf(signer), 7, "paid once");
    }

    function test_transferWithAuthorization_revertsOnNonceUsedByReceive() public {
        // Transfer and receive authorizations share one nonce space per authorizer.
        bytes32 nonce = keccak256("n");
        bytes memory receiveSig = receiveAuthorization(PAYER_KEY, other, 42, nonce);
        vm.prank(other);
        token.receiveWithAuthorization(payer, other, 42, 0, type(uint256).max, nonce, receiveSig);
        bytes memory sig = authorization(TRANSFER_TYPEHASH, PAYER_KEY, signer, 7, 0, type(uint256).max, nonce);
        vm.expectRevert(abi.encodeWithSelector(ERC3009.ERC3009UsedAuthorization.selector, payer, nonce));
        token.transferWithAuthorization(payer, signer, 7, 0, type(uint256).max, nonce, sig);
    }

    function test_receiveWithAuthorization_revertsOnReplay() public {
        bytes32 nonce = keccak256("n");
        bytes memory sig = receiveAuthorization(PAYER_KEY, other, 42, nonce);
        vm.prank(other);
        token.receiveWithAuthorization(payer, other, 42, 0, type(uint256).max, nonce, sig);
        vm.prank(other);
        vm.expectRevert(abi.encodeWithSelector(ERC3009.ERC3009UsedAuthorization.selector, payer, nonce));
        token.receiveWithAuthorization(payer, other, 42, 0, type(uint256).max, nonce, sig);
        vm.assertEq(token.balanceOf(other), 1_000_000e6 + 42, "received once");
    }

    function test_receiveWithAuthorization_revertsWhenNotYetValid() public {
        bytes32 nonce = keccak256("n");
        uint256 validAfter = block.timestamp;
        bytes memory sig = authorization(RECEIVE_TYPEHASH, PAYER_KEY, other, 42, validAfter, type(uint256).max, nonce);
        vm.prank(other);
        vm.expectRevert(
            abi.encodeWithSelector(ERC3009.ERC3009InvalidAuthorizationTime.selector, validAfter, type(uint256).max)
        );
        token.receiveWithAuthorization(payer, other, 42, validAfter, type(uint256).max, nonce, sig);
        vm.assertEq(token.balanceOf(other), 1_000_000e6, "nothing moved");
        vm.assertFalse(token.authorizationState(payer, nonce), "nonce unused");
    }

    function test_receiveWithAuthorization_revertsOnTransferAuthorization() public {
        // A TransferWithAuthorization signature is not a receive authorization.
        bytes32 nonce = keccak256("n");
        bytes memory sig = authorization(TRANSFER_TYPEHASH, PAYER_KEY, other, 42, 0, type(uint256).max, nonce);
        vm.prank(other);
        vm.expectRevert(ERC3009.ERC3009InvalidSignature.selector);
        token.receiveWithAuthorization(payer, other, 42, 0, type(uint256).max, nonce, sig);
    }

    function test_receiveWithAuthorization_succeedsForERC1271Wallet() public {
        MockWallet wallet = new MockWallet(signer);
        token.mint(address(wallet), 100);
        bytes32 nonce = keccak256("w");
        bytes memory sig = sign(
            SIGNER_KEY,
            authorizationDigest(RECEIVE_TYPEHASH, address(wallet), other, 42, 0, type(uint256).max, nonce)
        );
        vm.prank(other);
        token.receiveWithAuthorization(address(wallet), other, 42, 0, type(uint256).max, nonce, sig);
        vm.assertEq(token.balanceOf(address(wallet)), 58, "debited");
        vm.assertTrue(token.authorizationState(address(wallet), nonce), "nonce used");
    }

    function test_receiveWithAuthorization_revertsOnERC1271Rejection() public {
        MockWallet wallet = new MockWallet(signer);
        token.mint(address(wallet), 100);
        bytes32 nonce = keccak256("w");
        bytes memory sig = sign(
            OTHER_KEY, authorizationDigest(RECEIVE_TYPEHASH, address(wallet), other, 42, 0, type(uint256).max, nonce)
        );
        vm.prank(other);
        vm.expectRevert(ERC3009.ERC3009InvalidSignature.selector);
        token.receiveWithAuthorization(address(wallet), other, 42, 0, type(uint256).max, nonce, sig);
    }

    // ------------------------------------------------------------ (v, r, s) overloads

    function test_transferWithAuthorizationVRS_succeedsFromAnyCaller() public {
        bytes32 nonce = keccak256("vrs");
        (uint8 v, bytes32 r, bytes32 s) = vm.sign(
            PAYER_KEY, authorizationDigest(TRANSFER_TYPEHASH, payer, signer, 7, 0, type(uint256).max, nonce)
        );
        vm.expectEmit(address(token));
        emit IERC3009.AuthorizationUsed(payer, nonce);
        vm.prank(other);
        token.transferWithAuthorization(payer, signer, 7, 0, type(uint256).max, nonce, v, r, s);
        vm.assertEq(token.balanceOf(signer), 7, "transferred");
        vm.assertTrue(token.authorizationState(payer, nonce), "nonce used");
    }

    function test_transferWithAuthorizationVRS_revertsOnWrongSigner() public {
        bytes32 nonce = keccak256("vrs");
        (uint8 v, bytes32 r, bytes32 s) = vm.sign(
            OTHER_KEY, authorizationDigest(TRANSFER_TYPEHASH, payer, signer, 7, 0, type(uint256).max, nonce)
        );
        vm.expectRevert(ERC3009.ERC3009InvalidSignature.selector);
        token.transferWithAuthorization(payer, signer, 7, 0, type(uint256).max, nonce, v, r, s);
        vm.assertEq(token.balanceOf(signer), 0, "nothing moved");
    }

    function test_receiveWithAuthorizationVRS_succeedsForRecipient() public {
        bytes32 nonce = keccak256("vrs");
        (uint8 v, bytes32 r, bytes32 s) =
            vm.sign(PAYER_KEY, authorizationDigest(RECEIVE_TYPEHASH, payer, other, 42, 0, type(uint256).max, nonce));
        vm.prank(other);
        token.receiveWithAuthorization(payer, other, 42, 0, type(uint256).max, nonce, v, r, s);
        vm.assertEq(token.balanceOf(other), 1_000_000e6 + 42, "received");
        vm.assertTrue(token.authorizationState(payer, nonce), "nonce used");
    }

    function test_receiveWithAuthorizationVRS_revertsForOtherCaller() public {
        bytes32 nonce = keccak256("vrs");
        (uint8 v, bytes32 r, bytes32 s) =
            vm.sign(PAYER_KEY, authorizationDigest(RECEIVE_TYPEHASH, payer, other, 42, 0, type(uint256).max, nonce));
        vm.prank(payee);
        vm.expectRevert(abi.encodeWithSelector(IERC20Errors.ERC20InvalidReceiver.selector, other));
        token.receiveWithAuthorization(payer, other, 42, 0, type(uint256).max, nonce, v, r, s);
    }

    function test_receiveWithAuthorizationVRS_revertsOnWrongSigner() public {
        bytes32 nonce = keccak256("vrs");
        (uint8 v, bytes32 r, bytes32 s) =
            vm.sign(OTHER_KEY, authorizationDigest(RECEIVE_TYPEHASH, payer, other, 42, 0, type(uint256).max, nonce));
        vm.prank(other);
        vm.expectRevert(ERC3009.ERC3009InvalidSignature.selector);
        token.receiveWithAuthorization(payer, other, 42, 0, type(uint256).max, nonce, v, r, s);
    }

    // ------------------------------------------------------------ cancelAuthorization

    function test_cancelAuthorization_succeedsAndBlocksTheNonce() public {
        bytes32 nonce = keccak256("c");
        (uint8 v, bytes32 r, bytes32 s) = signCancel(PAYER_KEY, payer, nonce);
        vm.expectEmit(address(token));
        emit IERC3009Cancel.AuthorizationCanceled(payer, nonce);
        vm.prank(other); // anyone may submit the signed cancellation
        token.cancelAuthorization(payer, nonce, v, r, s);
        vm.assertTrue(token.authorizationState(payer, nonce), "nonce consumed");
        bytes memory sig = receiveAuthorization(PAYER_KEY, other, 42, nonce);
        vm.prank(other);
        vm.expectRevert(abi.encodeWithSelector(ERC3009.ERC3009UsedAuthorization.selector, payer, nonce));
        token.receiveWithAuthorization(payer, other, 42, 0, type(uint256).max, nonce, sig);
    }

    function test_cancelAuthorization_revertsOnWrongSigner() public {
        bytes32 nonce = keccak256("c");
        (uint8 v, bytes32 r, bytes32 s) = signCancel(OTHER_KEY, payer, nonce);
        vm.expectRevert(ERC3009.ERC3009InvalidSignature.selector);
        token.cancelAuthorization(payer, nonce, v, r, s);
        vm.assertFalse(token.authorizationState(payer, nonce), "nonce still usable");
    }

    function test_cancelAuthorization_revertsWhenNonceUsed() public {
        bytes32 nonce = keccak256("c");
        bytes memory sig = receiveAuthorization(PAYER_KEY, other, 42, nonce);
        vm.prank(other);
        token.receiveWithAuthorization(payer, other, 42, 0, type(uint256).max, nonce, sig);
        (uint8 v, bytes32 r, bytes32 s) = signCancel(PAYER_KEY, payer, nonce);
        vm.expectRevert(abi.encodeWithSelector(ERC3009.ERC3009UsedAuthorization.selector, payer, nonce));
        token.cancelAuthorization(payer, nonce, v, r, s);
    }

    function test_cancelAuthorization_revertsOnReplay() public {
        bytes32 nonce = keccak256("c");
        (uint8 v, bytes32 r, bytes32 s) = signCancel(PAYER_KEY, payer, nonce);
        token.cancelAuthorization(payer, nonce, v, r, s);
        vm.expectRevert(abi.encodeWithSelector(ERC3009.ERC3009UsedAuthorization.selector, payer, nonce));
        token.cancelAuthorization(payer, nonce, v, r, s);
    }

    function signCancel(uint256 key, address authorizer, bytes32 nonce)
        internal
        view
        returns (uint8 v, bytes32 r, bytes32 s)
    {
        bytes32 structHash = keccak256(abi.encode(CANCEL_TYPEHASH, authorizer, nonce));
        return vm.sign(key, keccak256(abi.encodePacked(hex"1901", tokenDomainSeparator(), structHash)));
    }
}
