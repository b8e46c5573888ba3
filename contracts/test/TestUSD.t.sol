// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {Base} from "./Base.sol";
import {TestUSD} from "../src/TestUSD.sol";
import {ERC3009} from "@openzeppelin/contracts/token/ERC20/extensions/draft-ERC3009.sol";
import {IERC20Errors} from "@openzeppelin/contracts/interfaces/draft-IERC6093.sol";

contract TestUSDTest is Base {
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
}
