// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {Base, FallbackToken, FeeToken, MockWallet, ReentrantToken} from "./Base.sol";
import {PaymentChannelEscrow} from "../src/PaymentChannelEscrow.sol";
import {ERC3009} from "@openzeppelin/contracts/token/ERC20/extensions/draft-ERC3009.sol";

contract PaymentChannelEscrowTest is Base {
    bytes32 constant SALT = bytes32(uint256(1));
    uint128 constant DEPOSIT = 1_000e6;
    /// By its signature, so that the tests build against an escrow without the error.
    bytes4 constant DEPOSIT_NOT_RECEIVED = bytes4(keccak256("DepositNotReceived()"));
    bytes4 constant REENTRANT_CALL = bytes4(keccak256("ReentrancyGuardReentrantCall()"));
    uint128 constant NESTED = 100e6;

    // ------------------------------------------------------------ wire-format vectors

    /// Same vector as test/chain/Voucher.test.ts; expected values come from viem's hashTypedData
    /// and signTypedData with anvil's first dev key.
    function test_voucherDigest_matchesFixedVector() public {
        address at = 0x1111111111111111111111111111111111111111;
        vm.etch(at, address(escrow).code);
        vm.chainId(31337);
        bytes32 channelId = keccak256("tollway voucher vector");
        vm.assertEq(channelId, 0x6a4550339109c230389cd4f8761237403d991eeb541398c1571ca37b53fffc4b, "channelId");
        bytes32 digest = PaymentChannelEscrow(at).voucherDigest(channelId, 1234567);
        vm.assertEq(digest, 0x5d0078a5fcb744204550d5478405071f1bf253c07e88fec79f911cdb281a86ad, "digest");
        bytes memory signature = sign(0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80, digest);
        vm.assertEq(
            signature,
            hex"0ac2a70ec0a818d3194cf5871cf3959c3ee3a073f9d19201bcb31f0f8f4c96583d1d5d315a0374c0a08fa182431ae2649f4c1eeb758504d2d3c1d3cd78ae696c1b",
            "signature"
        );
    }

    function test_computeChannelId_matchesDraftFormula() public view {
        bytes32 expected =
            keccak256(abi.encode(payer, payee, address(token), SALT, signer, address(escrow), block.chainid));
        vm.assertEq(escrow.computeChannelId(payer, payee, address(token), SALT, signer), expected, "channelId");
    }

    function test_domainSeparator_matchesDraftFormula() public view {
        bytes32 expected = keccak256(
            abi.encode(
                keccak256("EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"),
                keccak256("EVM Payment Channel"),
                keccak256("1"),
                block.chainid,
                address(escrow)
            )
        );
        vm.assertEq(escrow.domainSeparator(), expected, "domain separator");
    }

    // ------------------------------------------------------------ events

    function test_events_everyStateChangeIsLogged() public {
        bytes32 id = escrow.computeChannelId(payer, payee, address(token), SALT, address(0));
        vm.expectEmit(address(escrow));
        emit PaymentChannelEscrow.ChannelOpened(id, payer, payee, address(token), address(0), SALT, DEPOSIT);
        openChannel(DEPOSIT, SALT, address(0));

        bytes memory sig = voucher(PAYER_KEY, id, 100);
        vm.expectEmit(address(escrow));
        emit PaymentChannelEscrow.Settled(id, payee, 100, 100);
        vm.prank(payee);
        escrow.settle(id, 100, sig);

        vm.expectEmit(address(escrow));
        emit PaymentChannelEscrow.CloseRequested(id, payer, uint64(block.timestamp));
        vm.prank(payer);
        escrow.requestClose(id);

        vm.expectEmit(address(escrow));
        emit PaymentChannelEscrow.ToppedUp(id, payer, 5, DEPOSIT + 5);
        vm.expectEmit(address(escrow));
        emit PaymentChannelEscrow.CloseRequestCancelled(id);
        vm.prank(payer);
        escrow.topUp(id, 5);

        sig = voucher(PAYER_KEY, id, 300);
        vm.expectEmit(address(escrow));
        emit PaymentChannelEscrow.ChannelClosed(id, 300, 200, DEPOSIT + 5 - 300);
        vm.prank(payee);
        escrow.close(id, 300, sig);
    }

    function test_events_withdrawIsLogged() public {
        bytes32 id = openChannel(DEPOSIT, SALT, address(0));
        vm.prank(payer);
        escrow.requestClose(id);
        vm.warp(block.timestamp + 15 minutes);
        vm.expectEmit(address(escrow));
        emit PaymentChannelEscrow.Withdrawn(id, payer, DEPOSIT);
        vm.prank(payer);
        escrow.withdraw(id);
    }

    // ------------------------------------------------------------ open

    function test_open_succeeds() public {
        bytes32 id = openChannel(DEPOSIT, SALT, address(0));
        PaymentChannelEscrow.Channel memory c = escrow.getChannel(id);
        vm.assertEq(id, escrow.computeChannelId(payer, payee, address(token), SALT, address(0)), "id");
        vm.assertEq(c.payer, payer, "payer");
        vm.assertEq(c.payee, payee, "payee");
        vm.assertEq(c.token, address(token), "token");
        vm.assertEq(c.deposit, DEPOSIT, "deposit");
        vm.assertEq(c.settled, 0, "settled");
        vm.assertFalse(c.finalized, "finalized");
        vm.assertEq(token.balanceOf(address(escrow)), DEPOSIT, "escrow balance");
    }

    function test_open_revertsOnZeroDeposit() public {
        vm.prank(payer);
        vm.expectRevert(PaymentChannelEscrow.ZeroDeposit.selector);
        escrow.open(payee, address(token), 0, SALT, address(0));
    }

    function test_open_revertsWhenChannelExists() public {
        openChannel(DEPOSIT, SALT, address(0));
        vm.prank(payer);
        vm.expectRevert(PaymentChannelEscrow.ChannelAlreadyExists.selector);
        escrow.open(payee, address(token), DEPOSIT, SALT, address(0));
    }

    function test_open_revertsOnReopenAfterClose() public {
        bytes32 id = openChannel(DEPOSIT, SALT, address(0));
        payeeCloses(id, 100);
        vm.prank(payer);
        vm.expectRevert(PaymentChannelEscrow.ChannelAlreadyExists.selector);
        escrow.open(payee, address(token), DEPOSIT, SALT, address(0));
    }

    function test_open_revertsOnReopenAfterWithdraw() public {
        bytes32 id = openChannel(DEPOSIT, SALT, address(0));
        vm.prank(payer);
        escrow.requestClose(id);
        vm.warp(block.timestamp + 15 minutes);
        vm.prank(payer);
        escrow.withdraw(id);
        vm.prank(payer);
        vm.expectRevert(PaymentChannelEscrow.ChannelAlreadyExists.selector);
        escrow.open(payee, address(token), DEPOSIT, SALT, address(0));
    }

    function test_open_revertsWithoutAllowance() public {
        address poor = vm.addr(0xC0FFEE);
        token.mint(poor, DEPOSIT);
        vm.prank(poor);
        vm.expectRevert();
        escrow.open(payee, address(token), DEPOSIT, SALT, address(0));
    }

    // ------------------------------------------------------------ openWithAuthorization

    function test_openWithAuthorization_succeeds() public {
        bytes32 nonce = escrow.computeOpenNonce(payer, payee, address(token), SALT, signer);
        vm.assertEq(nonce, keccak256(abi.encode(payer, payee, address(token), SALT, signer)), "nonce derivation");
        bytes memory auth = receiveAuthorization(PAYER_KEY, address(escrow), DEPOSIT, nonce);
        vm.prank(other); // any relayer
        bytes32 id = escrow.openWithAuthorization(
            payee, address(token), DEPOSIT, SALT, signer, payer, 0, type(uint256).max, nonce, auth
        );
        PaymentChannelEscrow.Channel memory c = escrow.getChannel(id);
        vm.assertEq(c.payer, payer, "from becomes payer");
        vm.assertEq(c.authorizedSigner, signer, "signer");
        vm.assertEq(c.deposit, DEPOSIT, "deposit");
        vm.assertEq(id, escrow.computeChannelId(payer, payee, address(token), SALT, signer), "id uses from");
        vm.assertEq(token.balanceOf(address(escrow)), DEPOSIT, "escrow balance");
    }

    function test_openWithAuthorization_revertsOnNonceMismatch() public {
        bytes32 nonce = keccak256("not derived");
        bytes memory auth = receiveAuthorization(PAYER_KEY, address(escrow), DEPOSIT, nonce);
        vm.expectRevert(PaymentChannelEscrow.NonceMismatch.selector);
        escrow.openWithAuthorization(
            payee, address(token), DEPOSIT, SALT, address(0), payer, 0, type(uint256).max, nonce, auth
        );
    }

    function test_openWithAuthorization_revertsWhenFrontRunWithOtherPayee() public {
        // An attacker reusing the payer's authorization with another payee gets NonceMismatch.
        bytes32 nonce = escrow.computeOpenNonce(payer, payee, address(token), SALT, address(0));
        bytes memory auth = receiveAuthorization(PAYER_KEY, address(escrow), DEPOSIT, nonce);
        vm.expectRevert(PaymentChannelEscrow.NonceMismatch.selector);
        escrow.openWithAuthorization(
            other, address(token), DEPOSIT, SALT, address(0), payer, 0, type(uint256).max, nonce, auth
        );
    }

    function test_openWithAuthorization_revertsOnBadSignature() public {
        bytes32 nonce = escrow.computeOpenNonce(payer, payee, address(token), SALT, address(0));
        bytes memory auth = receiveAuthorization(OTHER_KEY, address(escrow), DEPOSIT, nonce);
        vm.expectRevert(ERC3009.ERC3009InvalidSignature.selector);
        escrow.openWithAuthorization(
            payee, address(token), DEPOSIT, SALT, address(0), payer, 0, type(uint256).max, nonce, auth
        );
    }

    function test_openWithAuthorization_revertsOnZeroDeposit() public {
        bytes32 nonce = escrow.computeOpenNonce(payer, payee, address(token), SALT, address(0));
        bytes memory auth = receiveAuthorization(PAYER_KEY, address(escrow), 0, nonce);
        vm.expectRevert(PaymentChannelEscrow.ZeroDeposit.selector);
        escrow.openWithAuthorization(
            payee, address(token), 0, SALT, address(0), payer, 0, type(uint256).max, nonce, auth
        );
    }

    function test_openWithAuthorization_revertsWhenChannelExists() public {
        bytes32 id = openChannel(DEPOSIT, SALT, address(0));
        bytes32 nonce = escrow.computeOpenNonce(payer, payee, address(token), SALT, address(0));
        bytes memory auth = receiveAuthorization(PAYER_KEY, address(escrow), DEPOSIT, nonce);
        vm.expectRevert(PaymentChannelEscrow.ChannelAlreadyExists.selector);
        escrow.openWithAuthorization(
            payee, address(token), DEPOSIT, SALT, address(0), payer, 0, type(uint256).max, nonce, auth
        );
        vm.assertEq(escrow.getChannel(id).deposit, DEPOSIT, "unchanged");
    }

    function test_openWithAuthorization_revertsWhenExpired() public {
        bytes32 nonce = escrow.computeOpenNonce(payer, payee, address(token), SALT, address(0));
        uint256 validBefore = block.timestamp; // exclusive bound: expired now
        bytes memory auth = receiveAuthorization(PAYER_KEY, address(escrow), DEPOSIT, nonce, validBefore);
        bytes32 id = escrow.computeChannelId(payer, payee, address(token), SALT, address(0));
        uint256 payerBefore = token.balanceOf(payer);
        vm.expectRevert(abi.encodeWithSelector(ERC3009.ERC3009InvalidAuthorizationTime.selector, 0, validBefore));
        escrow.openWithAuthorization(
            payee, address(token), DEPOSIT, SALT, address(0), payer, 0, validBefore, nonce, auth
        );
        assertNoChannel(id);
        vm.assertEq(token.balanceOf(payer), payerBefore, "payer balance unchanged");
        vm.assertEq(token.balanceOf(address(escrow)), 0, "escrow balance unchanged");
        vm.assertFalse(token.authorizationState(payer, nonce), "authorization still unused");
    }

    function test_openWithAuthorization_revertsWhenNotYetValid() public {
        bytes32 nonce = escrow.computeOpenNonce(payer, payee, address(token), SALT, address(0));
        uint256 validAfter = block.timestamp; // exclusive bound: valid only from the next second
        bytes memory auth =
            authorization(RECEIVE_TYPEHASH, PAYER_KEY, address(escrow), DEPOSIT, validAfter, type(uint256).max, nonce);
        bytes32 id = escrow.computeChannelId(payer, payee, address(token), SALT, address(0));
        vm.expectRevert(
            abi.encodeWithSelector(ERC3009.ERC3009InvalidAuthorizationTime.selector, validAfter, type(uint256).max)
        );
        escrow.openWithAuthorization(
            payee, address(token), DEPOSIT, SALT, address(0), payer, validAfter, type(uint256).max, nonce, auth
        );
        assertNoChannel(id);
        vm.assertEq(token.balanceOf(address(escrow)), 0, "escrow balance unchanged");
    }

    function test_openWithAuthorization_badSignatureLeavesNoChannel() public {
        bytes32 nonce = escrow.computeOpenNonce(payer, payee, address(token), SALT, address(0));
        bytes memory auth = receiveAuthorization(OTHER_KEY, address(escrow), DEPOSIT, nonce);
        bytes32 id = escrow.computeChannelId(payer, payee, address(token), SALT, address(0));
        vm.expectRevert(ERC3009.ERC3009InvalidSignature.selector);
        escrow.openWithAuthorization(
            payee, address(token), DEPOSIT, SALT, address(0), payer, 0, type(uint256).max, nonce, auth
        );
        assertNoChannel(id);
        // The same channel can still be opened with a valid authorization afterwards.
        auth = receiveAuthorization(PAYER_KEY, address(escrow), DEPOSIT, nonce);
        escrow.openWithAuthorization(
            payee, address(token), DEPOSIT, SALT, address(0), payer, 0, type(uint256).max, nonce, auth
        );
        vm.assertEq(escrow.getChannel(id).deposit, DEPOSIT, "opened later");
    }

    // ------------------------------------------------------------ topUp

    function test_topUp_succeeds() public {
        bytes32 id = openChannel(DEPOSIT, SALT, address(0));
        vm.prank(payer);
        escrow.topUp(id, 500);
        vm.assertEq(escrow.getChannel(id).deposit, DEPOSIT + 500, "deposit");
        vm.assertEq(token.balanceOf(address(escrow)), DEPOSIT + 500, "escrow balance");
    }

    function test_topUp_cancelsCloseRequest() public {
        bytes32 id = openChannel(DEPOSIT, SALT, address(0));
        vm.prank(payer);
        escrow.requestClose(id);
        vm.prank(payer);
        escrow.topUp(id, 1);
        assertCloseCancelled(id);
    }

    function test_topUp_revertsForNonPayer() public {
        bytes32 id = openChannel(DEPOSIT, SALT, address(0));
        vm.prank(other);
        vm.expectRevert(PaymentChannelEscrow.NotPayer.selector);
        escrow.topUp(id, 1);
    }

    function test_topUp_revertsOnZero() public {
        bytes32 id = openChannel(DEPOSIT, SALT, address(0));
        vm.prank(payer);
        vm.expectRevert(PaymentChannelEscrow.ZeroDeposit.selector);
        escrow.topUp(id, 0);
    }

    function test_topUp_revertsOnOverflow() public {
        token.mint(payer, type(uint256).max - token.totalSupply());
        bytes32 id = openChannel(type(uint128).max, SALT, address(0));
        vm.prank(payer);
        vm.expectRevert(PaymentChannelEscrow.DepositOverflow.selector);
        escrow.topUp(id, 1);
    }

    function test_topUp_revertsOnUnknownChannel() public {
        vm.prank(payer);
        vm.expectRevert(PaymentChannelEscrow.ChannelNotFound.selector);
        escrow.topUp(keccak256("nope"), 1);
    }

    function test_topUp_revertsWhenFinalized() public {
        bytes32 id = openChannel(DEPOSIT, SALT, address(0));
        vm.prank(payee);
        escrow.close(id, 0, "");
        vm.prank(payer);
        vm.expectRevert(PaymentChannelEscrow.ChannelFinalized.selector);
        escrow.topUp(id, 1);
    }

    // ------------------------------------------------------------ topUpWithAuthorization

    function test_topUpWithAuthorization_succeedsFromThirdParty() public {
        bytes32 id = openChannel(DEPOSIT, SALT, address(0));
        vm.prank(payer);
        escrow.requestClose(id);
        bytes32 topUpSalt = keccak256("t1");
        bytes32 nonce = escrow.computeTopUpNonce(id, 700, other, topUpSalt);
        vm.assertEq(nonce, keccak256(abi.encode(id, uint128(700), other, topUpSalt)), "nonce derivation");
        bytes memory auth = receiveAuthorization(OTHER_KEY, address(escrow), 700, nonce);
        escrow.topUpWithAuthorization(id, 700, other, topUpSalt, 0, type(uint256).max, nonce, auth);
        PaymentChannelEscrow.Channel memory c = escrow.getChannel(id);
        vm.assertEq(c.deposit, DEPOSIT + 700, "deposit");
        vm.assertTrue(c.closeRequestedAt != 0, "third-party top-up keeps the payer's close request");
    }

    function test_topUpWithAuthorization_byPayerCancelsCloseRequest() public {
        bytes32 id = openChannel(DEPOSIT, SALT, address(0));
        vm.prank(payer);
        escrow.requestClose(id);
        uint64 requestedAt = escrow.getChannel(id).closeRequestedAt;
        // Made for after the close request: valid from the request's second on.
        bytes32 nonce = escrow.computeTopUpNonce(id, 5, payer, SALT);
        bytes memory auth =
            authorization(RECEIVE_TYPEHASH, PAYER_KEY, address(escrow), 5, requestedAt, type(uint256).max, nonce);
        vm.warp(block.timestamp + 1); // EIP-3009's validAfter is exclusive
        vm.expectEmit(address(escrow));
        emit PaymentChannelEscrow.ToppedUp(id, payer, 5, DEPOSIT + 5);
        vm.expectEmit(address(escrow));
        emit PaymentChannelEscrow.CloseRequestCancelled(id);
        vm.prank(payee);
        escrow.topUpWithAuthorization(id, 5, payer, SALT, requestedAt, type(uint256).max, nonce, auth);
        assertCloseCancelled(id);
    }

    /// An authorization the payer signed before it requested the close (one it gave the payee and
    /// the payee never used) is not the payer's wish to keep the channel: submitting it after the
    /// request adds its deposit and leaves the close standing, so the payee cannot restart the
    /// payer's grace period with it.
    function test_topUpWithAuthorization_byPayerSignedBeforeCloseRequestKeepsIt() public {
        bytes32 id = openChannel(DEPOSIT, SALT, address(0));
        bytes32 nonce = escrow.computeTopUpNonce(id, 5, payer, SALT);
        bytes memory auth = receiveAuthorization(PAYER_KEY, address(escrow), 5, nonce);
        vm.warp(block.timestamp + 60);
        vm.prank(payer);
        escrow.requestClose(id);
        uint64 requestedAt = escrow.getChannel(id).closeRequestedAt;
        vm.warp(block.timestamp + 10 minutes);
        uint256 payerBefore = token.balanceOf(payer);
        vm.prank(payee);
        escrow.topUpWithAuthorization(id, 5, payer, SALT, 0, type(uint256).max, nonce, auth);
        assertToppedUpKeepingClose(id, 5, requestedAt);
        vm.assertTrue(token.authorizationState(payer, nonce), "authorization used");
        // The grace period still ends 15 minutes after the original request; the payer gets the
        // top-up back with the rest.
        vm.warp(uint256(requestedAt) + 15 minutes);
        vm.prank(payer);
        escrow.withdraw(id);
        vm.assertEq(token.balanceOf(payer), payerBefore + DEPOSIT, "deposit and top-up refunded");
    }

    /// validAfter one second before the request: made before it, so it does not cancel.
    function test_topUpWithAuthorization_byPayerValidBeforeCloseRequestKeepsIt() public {
        bytes32 id = openChannel(DEPOSIT, SALT, address(0));
        vm.warp(block.timestamp + 60);
        vm.prank(payer);
        escrow.requestClose(id);
        uint64 requestedAt = escrow.getChannel(id).closeRequestedAt;
        bytes32 nonce = escrow.computeTopUpNonce(id, 5, payer, SALT);
        uint256 validAfter = uint256(requestedAt) - 1;
        bytes memory auth =
            authorization(RECEIVE_TYPEHASH, PAYER_KEY, address(escrow), 5, validAfter, type(uint256).max, nonce);
        vm.warp(block.timestamp + 1);
        escrow.topUpWithAuthorization(id, 5, payer, SALT, validAfter, type(uint256).max, nonce, auth);
        assertToppedUpKeepingClose(id, 5, requestedAt);
    }

    /// A third party's top-up never cancels, whatever its validAfter.
    function test_topUpWithAuthorization_byThirdPartyValidAfterCloseRequestKeepsIt() public {
        bytes32 id = openChannel(DEPOSIT, SALT, address(0));
        vm.prank(payer);
        escrow.requestClose(id);
        uint64 requestedAt = escrow.getChannel(id).closeRequestedAt;
        bytes32 nonce = escrow.computeTopUpNonce(id, 5, other, SALT);
        bytes memory auth =
            authorization(RECEIVE_TYPEHASH, OTHER_KEY, address(escrow), 5, requestedAt, type(uint256).max, nonce);
        vm.warp(block.timestamp + 1);
        escrow.topUpWithAuthorization(id, 5, other, SALT, requestedAt, type(uint256).max, nonce, auth);
        assertToppedUpKeepingClose(id, 5, requestedAt);
    }

    /// A top-up by authorization cancels a pending close exactly when the payer funds it and its
    /// validAfter is at or after the request; it always adds its deposit.
    function testFuzz_topUpWithAuthorization_cancelsOnlyPayersAuthorizationFromCloseRequest(
        uint32 beforeRequest,
        uint32 distance,
        bool afterRequest,
        bool byPayer
    ) public {
        bytes32 id = openChannel(DEPOSIT, SALT, address(0));
        vm.warp(block.timestamp + beforeRequest);
        vm.prank(payer);
        escrow.requestClose(id);
        uint64 requestedAt = escrow.getChannel(id).closeRequestedAt;
        uint256 validAfter = afterRequest
            ? uint256(requestedAt) + distance
            : (distance >= requestedAt ? 0 : uint256(requestedAt) - distance);
        (uint256 key, address from) = byPayer ? (PAYER_KEY, payer) : (OTHER_KEY, other);
        bytes32 nonce = escrow.computeTopUpNonce(id, 5, from, SALT);
        bytes memory auth =
            authorization(RECEIVE_TYPEHASH, key, address(escrow), 5, validAfter, type(uint256).max, nonce);
        if (validAfter >= block.timestamp) vm.warp(validAfter + 1);
        escrow.topUpWithAuthorization(id, 5, from, SALT, validAfter, type(uint256).max, nonce, auth);
        PaymentChannelEscrow.Channel memory c = escrow.getChannel(id);
        vm.assertEq(c.deposit, DEPOSIT + 5, "deposit added");
        bool cancels = byPayer && validAfter >= requestedAt;
        vm.assertEq(c.closeRequestedAt, cancels ? 0 : requestedAt, "cancelled only by the payer's later authorization");
    }

    function test_topUpWithAuthorization_revertsOnNonceMismatch() public {
        bytes32 id = openChannel(DEPOSIT, SALT, address(0));
        bytes32 nonce = escrow.computeTopUpNonce(id, 5, payer, SALT);
        bytes memory auth = receiveAuthorization(PAYER_KEY, address(escrow), 6, nonce);
        vm.expectRevert(PaymentChannelEscrow.NonceMismatch.selector);
        escrow.topUpWithAuthorization(id, 6, payer, SALT, 0, type(uint256).max, nonce, auth);
    }

    function test_topUpWithAuthorization_revertsOnReplay() public {
        bytes32 id = openChannel(DEPOSIT, SALT, address(0));
        bytes32 nonce = escrow.computeTopUpNonce(id, 5, payer, SALT);
        bytes memory auth = receiveAuthorization(PAYER_KEY, address(escrow), 5, nonce);
        escrow.topUpWithAuthorization(id, 5, payer, SALT, 0, type(uint256).max, nonce, auth);
        vm.expectRevert(abi.encodeWithSelector(ERC3009.ERC3009UsedAuthorization.selector, payer, nonce));
        escrow.topUpWithAuthorization(id, 5, payer, SALT, 0, type(uint256).max, nonce, auth);
    }

    function test_topUpWithAuthorization_revertsOnUnknownChannel() public {
        bytes32 id = keccak256("nope");
        bytes32 nonce = escrow.computeTopUpNonce(id, 5, payer, SALT);
        bytes memory auth = receiveAuthorization(PAYER_KEY, address(escrow), 5, nonce);
        vm.expectRevert(PaymentChannelEscrow.ChannelNotFound.selector);
        escrow.topUpWithAuthorization(id, 5, payer, SALT, 0, type(uint256).max, nonce, auth);
    }

    function test_topUpWithAuthorization_revertsOnZero() public {
        bytes32 id = openChannel(DEPOSIT, SALT, address(0));
        bytes32 nonce = escrow.computeTopUpNonce(id, 0, payer, SALT);
        bytes memory auth = receiveAuthorization(PAYER_KEY, address(escrow), 0, nonce);
        vm.expectRevert(PaymentChannelEscrow.ZeroDeposit.selector);
        escrow.topUpWithAuthorization(id, 0, payer, SALT, 0, type(uint256).max, nonce, auth);
    }

    function test_topUpWithAuthorization_revertsOnOverflow() public {
        token.mint(payer, type(uint256).max - token.totalSupply());
        bytes32 id = openChannel(type(uint128).max, SALT, address(0));
        bytes32 nonce = escrow.computeTopUpNonce(id, 1, payer, SALT);
        bytes memory auth = receiveAuthorization(PAYER_KEY, address(escrow), 1, nonce);
        vm.expectRevert(PaymentChannelEscrow.DepositOverflow.selector);
        escrow.topUpWithAuthorization(id, 1, payer, SALT, 0, type(uint256).max, nonce, auth);
    }

    function test_topUpWithAuthorization_revertsWhenFinalized() public {
        bytes32 id = openChannel(DEPOSIT, SALT, address(0));
        vm.prank(payee);
        escrow.close(id, 0, "");
        bytes32 nonce = escrow.computeTopUpNonce(id, 5, payer, SALT);
        bytes memory auth = receiveAuthorization(PAYER_KEY, address(escrow), 5, nonce);
        vm.expectRevert(PaymentChannelEscrow.ChannelFinalized.selector);
        escrow.topUpWithAuthorization(id, 5, payer, SALT, 0, type(uint256).max, nonce, auth);
    }

    function test_topUpWithAuthorization_revertsOnBadSignature() public {
        bytes32 id = openChannel(DEPOSIT, SALT, address(0));
        vm.prank(payer);
        escrow.requestClose(id);
        uint64 requestedAt = escrow.getChannel(id).closeRequestedAt;
        bytes32 nonce = escrow.computeTopUpNonce(id, 5, payer, SALT);
        bytes memory auth = receiveAuthorization(OTHER_KEY, address(escrow), 5, nonce);
        uint256 payerBefore = token.balanceOf(payer);
        uint256 otherBefore = token.balanceOf(other);
        vm.expectRevert(ERC3009.ERC3009InvalidSignature.selector);
        escrow.topUpWithAuthorization(id, 5, payer, SALT, 0, type(uint256).max, nonce, auth);
        PaymentChannelEscrow.Channel memory c = escrow.getChannel(id);
        vm.assertEq(c.deposit, DEPOSIT, "deposit unchanged");
        // The payer-funded top-up would have cancelled the close request: that must roll back too.
        vm.assertEq(c.closeRequestedAt, requestedAt, "close request kept");
        vm.assertEq(token.balanceOf(payer), payerBefore, "payer balance unchanged");
        vm.assertEq(token.balanceOf(other), otherBefore, "signer's balance unchanged");
        vm.assertEq(token.balanceOf(address(escrow)), DEPOSIT, "escrow balance unchanged");
        vm.assertFalse(token.authorizationState(payer, nonce), "authorization still unused");
    }

    function test_topUpWithAuthorization_revertsWhenExpired() public {
        bytes32 id = openChannel(DEPOSIT, SALT, address(0));
        vm.prank(payer);
        escrow.requestClose(id);
        uint64 requestedAt = escrow.getChannel(id).closeRequestedAt;
        bytes32 nonce = escrow.computeTopUpNonce(id, 5, payer, SALT);
        uint256 validBefore = block.timestamp + 60;
        bytes memory auth = receiveAuthorization(PAYER_KEY, address(escrow), 5, nonce, validBefore);
        vm.warp(validBefore); // exclusive bound: expired from this second on
        uint256 payerBefore = token.balanceOf(payer);
        vm.expectRevert(abi.encodeWithSelector(ERC3009.ERC3009InvalidAuthorizationTime.selector, 0, validBefore));
        escrow.topUpWithAuthorization(id, 5, payer, SALT, 0, validBefore, nonce, auth);
        PaymentChannelEscrow.Channel memory c = escrow.getChannel(id);
        vm.assertEq(c.deposit, DEPOSIT, "deposit unchanged");
        vm.assertEq(c.closeRequestedAt, requestedAt, "close request kept");
        vm.assertEq(token.balanceOf(payer), payerBefore, "payer balance unchanged");
        vm.assertEq(token.balanceOf(address(escrow)), DEPOSIT, "escrow balance unchanged");
        vm.assertFalse(token.authorizationState(payer, nonce), "authorization still unused");
    }

    function test_topUpWithAuthorization_succeedsOneSecondBeforeExpiry() public {
        bytes32 id = openChannel(DEPOSIT, SALT, address(0));
        bytes32 nonce = escrow.computeTopUpNonce(id, 5, payer, SALT);
        uint256 validBefore = block.timestamp + 60;
        bytes memory auth = receiveAuthorization(PAYER_KEY, address(escrow), 5, nonce, validBefore);
        vm.warp(validBefore - 1);
        escrow.topUpWithAuthorization(id, 5, payer, SALT, 0, validBefore, nonce, auth);
        vm.assertEq(escrow.getChannel(id).deposit, DEPOSIT + 5, "deposit");
        vm.assertEq(token.balanceOf(address(escrow)), DEPOSIT + 5, "escrow balance");
    }

    function test_topUpWithAuthorization_revertsWhenNotYetValid() public {
        bytes32 id = openChannel(DEPOSIT, SALT, address(0));
        bytes32 nonce = escrow.computeTopUpNonce(id, 5, payer, SALT);
        uint256 validAfter = block.timestamp;
        bytes memory auth =
            authorization(RECEIVE_TYPEHASH, PAYER_KEY, address(escrow), 5, validAfter, type(uint256).max, nonce);
        vm.expectRevert(
            abi.encodeWithSelector(ERC3009.ERC3009InvalidAuthorizationTime.selector, validAfter, type(uint256).max)
        );
        escrow.topUpWithAuthorization(id, 5, payer, SALT, validAfter, type(uint256).max, nonce, auth);
        vm.assertEq(escrow.getChannel(id).deposit, DEPOSIT, "deposit unchanged");
        vm.assertEq(token.balanceOf(address(escrow)), DEPOSIT, "escrow balance unchanged");
    }

    // ------------------------------------------------------------ deposits are what arrived

    /// A token whose fallback takes any call (WETH9's does): an attacker "funds" a channel to
    /// itself with a receiveWithAuthorization that moves nothing, then closes it as its payee and
    /// is refunded out of an honest channel of the same token.
    function test_openWithAuthorization_revertsWhenTokenMovesNothing() public {
        FallbackToken wrap = new FallbackToken();
        wrap.mint(other, DEPOSIT);
        vm.startPrank(other);
        wrap.approve(address(escrow), DEPOSIT);
        escrow.open(payee, address(wrap), DEPOSIT, SALT, address(0));
        vm.stopPrank();

        address attacker = vm.addr(0xE11);
        bytes32 nonce = escrow.computeOpenNonce(attacker, attacker, address(wrap), SALT, address(0));
        vm.prank(attacker);
        vm.expectRevert(DEPOSIT_NOT_RECEIVED);
        escrow.openWithAuthorization(
            attacker, address(wrap), DEPOSIT, SALT, address(0), attacker, 0, type(uint256).max, nonce, ""
        );
        vm.assertEq(wrap.balanceOf(address(escrow)), DEPOSIT, "the honest deposit is still held");
    }

    /// The same token: a channel opened with 1 unit topped up for free, then withdrawn in full.
    function test_topUpWithAuthorization_revertsWhenTokenMovesNothing() public {
        FallbackToken wrap = new FallbackToken();
        wrap.mint(other, DEPOSIT);
        wrap.mint(payer, 1);
        vm.prank(other);
        wrap.approve(address(escrow), DEPOSIT);
        vm.prank(other);
        escrow.open(payee, address(wrap), DEPOSIT, SALT, address(0));
        vm.prank(payer);
        wrap.approve(address(escrow), 1);
        vm.prank(payer);
        bytes32 id = escrow.open(payee, address(wrap), 1, SALT, address(0));

        bytes32 nonce = escrow.computeTopUpNonce(id, DEPOSIT, payer, SALT);
        vm.expectRevert(DEPOSIT_NOT_RECEIVED);
        escrow.topUpWithAuthorization(id, DEPOSIT, payer, SALT, 0, type(uint256).max, nonce, "");
        vm.assertEq(escrow.getChannel(id).deposit, 1, "deposit unchanged");
    }

    /// A fee-on-transfer token: the escrow would record 1,000 while holding 990, and the payee
    /// would settle the difference out of other channels.
    function test_open_revertsWhenLessArrives() public {
        FeeToken fee = new FeeToken();
        fee.charge(true);
        fee.mint(payer, DEPOSIT);
        vm.startPrank(payer);
        fee.approve(address(escrow), DEPOSIT);
        vm.expectRevert(DEPOSIT_NOT_RECEIVED);
        escrow.open(payee, address(fee), DEPOSIT, SALT, address(0));
        vm.stopPrank();
    }

    function test_topUp_revertsWhenLessArrives() public {
        FeeToken fee = new FeeToken();
        fee.mint(payer, DEPOSIT);
        vm.startPrank(payer);
        fee.approve(address(escrow), DEPOSIT);
        bytes32 id = escrow.open(payee, address(fee), 100, SALT, address(0));
        vm.stopPrank();
        fee.charge(true);
        vm.prank(payer);
        vm.expectRevert(DEPOSIT_NOT_RECEIVED);
        escrow.topUp(id, 200);
        vm.assertEq(escrow.getChannel(id).deposit, 100, "deposit unchanged");
    }

    // ------------------------------------------------------------ no call within another

    /// open nesting an open: the payer's 1,000 arrive as 900, the token's own channel's 100 in
    /// full; each deposit saw the balance grow by its amount, and 1,100 were credited for 1,000.
    function test_open_revertsWhenTokenNestsADeposit() public {
        ReentrantToken hook = hookToken();
        hook.arm(NESTED, bytes32(0));
        vm.prank(payer);
        try escrow.open(payee, address(hook), DEPOSIT, SALT, address(0)) returns (bytes32 id) {
            assertCreditedHeld(hook, id, nestedOpen(hook));
        } catch (bytes memory reason) {
            assertRefused(hook, reason);
        }
    }

    /// topUp nesting a topUp of a channel the token pays.
    function test_topUp_revertsWhenTokenNestsADeposit() public {
        ReentrantToken hook = hookToken();
        bytes32 own = hook.openOwn(1, SALT);
        vm.prank(payer);
        bytes32 id = escrow.open(payee, address(hook), 1, SALT, address(0));
        hook.arm(NESTED, own);
        vm.prank(payer);
        try escrow.topUp(id, DEPOSIT) {
            assertCreditedHeld(hook, id, own);
        } catch (bytes memory reason) {
            assertRefused(hook, reason);
            vm.assertEq(escrow.getChannel(id).deposit + escrow.getChannel(own).deposit, 2, "deposits unchanged");
        }
    }

    /// openWithAuthorization (anyone submits it) nesting a topUp.
    function test_openWithAuthorization_revertsWhenTokenNestsADeposit() public {
        ReentrantToken hook = hookToken();
        bytes32 own = hook.openOwn(1, SALT);
        hook.arm(NESTED, own);
        bytes32 nonce = escrow.computeOpenNonce(payer, payee, address(hook), SALT, address(0));
        try escrow.openWithAuthorization(
            payee, address(hook), DEPOSIT, SALT, address(0), payer, 0, type(uint256).max, nonce, ""
        ) returns (bytes32 id) {
            assertCreditedHeld(hook, id, own);
        } catch (bytes memory reason) {
            assertRefused(hook, reason);
        }
    }

    /// topUpWithAuthorization nesting an open.
    function test_topUpWithAuthorization_revertsWhenTokenNestsADeposit() public {
        ReentrantToken hook = hookToken();
        vm.prank(payer);
        bytes32 id = escrow.open(payee, address(hook), 1, SALT, address(0));
        hook.arm(NESTED, bytes32(0));
        bytes32 nonce = escrow.computeTopUpNonce(id, DEPOSIT, payer, SALT);
        try escrow.topUpWithAuthorization(id, DEPOSIT, payer, SALT, 0, type(uint256).max, nonce, "") {
            assertCreditedHeld(hook, id, nestedOpen(hook));
        } catch (bytes memory reason) {
            assertRefused(hook, reason);
            vm.assertEq(escrow.getChannel(id).deposit, 1, "deposit unchanged");
        }
    }

    /// Payouts change state before they transfer, so a deposit nested in one is credited only
    /// what arrives; they are still refused, so that no escrow call ever runs inside another.
    function test_payouts_revertWhenTokenNestsADeposit() public {
        ReentrantToken hook = hookToken();
        vm.prank(payer);
        bytes32 id = escrow.open(payee, address(hook), DEPOSIT, SALT, address(0));

        hook.arm(NESTED, bytes32(0));
        bytes memory sig = voucher(PAYER_KEY, id, 300);
        vm.prank(payee);
        vm.expectRevert(REENTRANT_CALL);
        escrow.settle(id, 300, sig);

        vm.prank(payee);
        vm.expectRevert(REENTRANT_CALL);
        escrow.close(id, 300, sig);

        vm.prank(payer);
        escrow.requestClose(id);
        vm.warp(block.timestamp + escrow.CLOSE_GRACE_PERIOD());
        vm.prank(payer);
        vm.expectRevert(REENTRANT_CALL);
        escrow.withdraw(id);

        hook.arm(0, bytes32(0));
        vm.prank(payer);
        escrow.withdraw(id);
        vm.assertEq(hook.balanceOf(address(escrow)), DEPOSIT, "only the honest channel is held");
    }

    /// A hook token with an honest channel of DEPOSIT (other's) that an over-credit is paid from.
    function hookToken() internal returns (ReentrantToken hook) {
        hook = new ReentrantToken(escrow, payee);
        hook.mint(payer, DEPOSIT);
        hook.mint(other, DEPOSIT);
        hook.mint(address(hook), NESTED + 1);
        vm.prank(payer);
        hook.approve(address(escrow), type(uint256).max);
        vm.startPrank(other);
        hook.approve(address(escrow), DEPOSIT);
        escrow.open(payee, address(hook), DEPOSIT, SALT, address(0));
        vm.stopPrank();
    }

    function nestedOpen(ReentrantToken hook) internal view returns (bytes32) {
        return escrow.computeChannelId(address(hook), payee, address(hook), bytes32("nested"), address(0));
    }

    /// The deposit went through: what the escrow records for the token's channels (the honest
    /// one, the attacked one and the nested one) must be what it holds of the token.
    function assertCreditedHeld(ReentrantToken hook, bytes32 id, bytes32 nested) internal view {
        uint256 credited = DEPOSIT + escrow.getChannel(id).deposit + escrow.getChannel(nested).deposit;
        vm.assertEq(credited, hook.balanceOf(address(escrow)), "credited equals held");
    }

    function assertRefused(ReentrantToken hook, bytes memory reason) internal view {
        vm.assertEq(bytes4(reason), REENTRANT_CALL, "the nested deposit is refused");
        vm.assertEq(uint256(escrow.getChannel(nestedOpen(hook)).deposit), 0, "no nested channel");
    }

    // ------------------------------------------------------------ settle

    function test_settle_succeeds() public {
        bytes32 id = openChannel(DEPOSIT, SALT, address(0));
        payeeSettles(id, 300);
        payeeSettles(id, 450);
        vm.assertEq(escrow.getChannel(id).settled, 450, "settled");
        vm.assertEq(token.balanceOf(payee), 450, "payee paid the cumulative amount once");
    }

    function test_settle_acceptsAuthorizedSigner() public {
        bytes32 id = openChannel(DEPOSIT, SALT, signer);
        payeeSettles(id, 10, SIGNER_KEY);
        vm.assertEq(token.balanceOf(payee), 10, "paid");
    }

    function test_settle_revertsOnPayerSignatureWhenSignerDelegated() public {
        bytes32 id = openChannel(DEPOSIT, SALT, signer);
        bytes memory sig = voucher(PAYER_KEY, id, 10);
        vm.prank(payee);
        vm.expectRevert(PaymentChannelEscrow.InvalidSignature.selector);
        escrow.settle(id, 10, sig);
    }

    function test_settle_acceptsERC1271Signer() public {
        MockWallet wallet = new MockWallet(signer);
        bytes32 id = openChannel(DEPOSIT, SALT, address(wallet));
        payeeSettles(id, 10, SIGNER_KEY);
        vm.assertEq(token.balanceOf(payee), 10, "paid");
    }

    function test_settle_revertsOnERC1271Rejection() public {
        MockWallet wallet = new MockWallet(signer);
        bytes32 id = openChannel(DEPOSIT, SALT, address(wallet));
        bytes memory sig = voucher(OTHER_KEY, id, 10);
        vm.prank(payee);
        vm.expectRevert(PaymentChannelEscrow.InvalidSignature.selector);
        escrow.settle(id, 10, sig);
    }

    /// A payer signs vouchers with its key, is served, then gives its account code (an EIP-7702
    /// delegation: the designator is etched here, pointing at a contract without ERC-1271) and
    /// asks to close. Its key's signatures must still pay the payee, or the payer withdraws all.
    function test_settle_acceptsKeySignatureAfterSignerGainsCode() public {
        bytes32 id = openChannel(DEPOSIT, SALT, address(0));
        bytes memory sig = voucher(PAYER_KEY, id, 10);
        vm.etch(payer, abi.encodePacked(hex"ef0100", address(token)));
        vm.prank(payer);
        escrow.requestClose(id);
        vm.prank(payee);
        escrow.settle(id, 10, sig);
        vm.assertEq(token.balanceOf(payee), 10, "paid");
    }

    function test_close_acceptsKeySignatureAfterSignerGainsCode() public {
        bytes32 id = openChannel(DEPOSIT, SALT, signer);
        bytes memory sig = voucher(SIGNER_KEY, id, 10);
        vm.etch(signer, abi.encodePacked(hex"ef0100", address(token)));
        vm.prank(payee);
        escrow.close(id, 10, sig);
        vm.assertEq(token.balanceOf(payee), 10, "paid");
    }

    /// The key that owns a wallet signs for the wallet only through the wallet's ERC-1271 answer:
    /// recovering the key's own address is no match for the wallet's.
    function test_settle_revertsOnOwnerKeySignatureWhenWalletRefuses() public {
        MockWallet wallet = new MockWallet(signer);
        bytes32 id = openChannel(DEPOSIT, SALT, address(wallet));
        vm.etch(address(wallet), abi.encodePacked(hex"ef0100", address(token)));
        bytes memory sig = voucher(SIGNER_KEY, id, 10);
        vm.prank(payee);
        vm.expectRevert(PaymentChannelEscrow.InvalidSignature.selector);
        escrow.settle(id, 10, sig);
    }

    function test_settle_revertsForNonPayee() public {
        bytes32 id = openChannel(DEPOSIT, SALT, address(0));
        bytes memory sig = voucher(PAYER_KEY, id, 10);
        vm.prank(other);
        vm.expectRevert(PaymentChannelEscrow.NotPayee.selector);
        escrow.settle(id, 10, sig);
    }

    function test_settle_revertsWhenNotIncreasing() public {
        bytes32 id = openChannel(DEPOSIT, SALT, address(0));
        payeeSettles(id, 10);
        bytes memory sig = voucher(PAYER_KEY, id, 10);
        vm.prank(payee);
        vm.expectRevert(PaymentChannelEscrow.AmountNotIncreasing.selector);
        escrow.settle(id, 10, sig);
        bytes memory zero = voucher(PAYER_KEY, id, 0);
        vm.prank(payee);
        vm.expectRevert(PaymentChannelEscrow.AmountNotIncreasing.selector);
        escrow.settle(id, 0, zero);
    }

    function test_settle_revertsAboveDeposit() public {
        bytes32 id = openChannel(DEPOSIT, SALT, address(0));
        bytes memory sig = voucher(PAYER_KEY, id, DEPOSIT + 1);
        vm.prank(payee);
        vm.expectRevert(PaymentChannelEscrow.AmountExceedsDeposit.selector);
        escrow.settle(id, DEPOSIT + 1, sig);
    }

    function test_settle_revertsOnWrongSigner() public {
        bytes32 id = openChannel(DEPOSIT, SALT, address(0));
        bytes memory sig = voucher(OTHER_KEY, id, 10);
        vm.prank(payee);
        vm.expectRevert(PaymentChannelEscrow.InvalidSignature.selector);
        escrow.settle(id, 10, sig);
    }

    function test_settle_revertsOnTamperedAmount() public {
        bytes32 id = openChannel(DEPOSIT, SALT, address(0));
        bytes memory sig = voucher(PAYER_KEY, id, 10);
        vm.prank(payee);
        vm.expectRevert(PaymentChannelEscrow.InvalidSignature.selector);
        escrow.settle(id, 11, sig);
    }

    function test_settle_revertsOnHighS() public {
        bytes32 id = openChannel(DEPOSIT, SALT, address(0));
        bytes memory low = voucher(PAYER_KEY, id, 10);
        bytes memory high = highS(low);
        // The malleable copy still recovers to the payer: only the low-s rule rejects it.
        (bytes32 r, bytes32 s) = (bytes32(0), bytes32(0));
        assembly {
            r := mload(add(high, 32))
            s := mload(add(high, 64))
        }
        vm.assertEq(ecrecover(escrow.voucherDigest(id, 10), uint8(high[64]), r, s), payer, "high-s recovers");
        vm.assertTrue(uint256(s) > HALF_ORDER, "is high-s");
        vm.prank(payee);
        vm.expectRevert(PaymentChannelEscrow.InvalidSignature.selector);
        escrow.settle(id, 10, high);
    }

    function test_settle_revertsOnCompact64ByteSignature() public {
        bytes32 id = openChannel(DEPOSIT, SALT, address(0));
        (bytes32 r, bytes32 vs) = vm.signCompact(PAYER_KEY, escrow.voucherDigest(id, 10));
        vm.prank(payee);
        vm.expectRevert(PaymentChannelEscrow.InvalidSignature.selector);
        escrow.settle(id, 10, abi.encodePacked(r, vs));
    }

    function test_settle_revertsOnMalformedSignature() public {
        bytes32 id = openChannel(DEPOSIT, SALT, address(0));
        vm.prank(payee);
        vm.expectRevert(PaymentChannelEscrow.InvalidSignature.selector);
        escrow.settle(id, 10, hex"1234");
    }

    function test_settle_revertsOnVoucherFromOtherChannel() public {
        bytes32 a = openChannel(DEPOSIT, SALT, address(0));
        bytes32 b = openChannel(DEPOSIT, bytes32(uint256(2)), address(0));
        bytes memory sig = voucher(PAYER_KEY, a, 10);
        vm.prank(payee);
        vm.expectRevert(PaymentChannelEscrow.InvalidSignature.selector);
        escrow.settle(b, 10, sig);
    }

    function test_settle_revertsOnVoucherFromOtherContract() public {
        PaymentChannelEscrow twin = new PaymentChannelEscrow();
        vm.prank(payer);
        token.approve(address(twin), type(uint256).max);
        bytes32 id = openChannel(DEPOSIT, SALT, address(0));
        vm.prank(payer);
        bytes32 twinId = twin.open(payee, address(token), DEPOSIT, SALT, address(0));
        bytes memory sig = sign(PAYER_KEY, twin.voucherDigest(twinId, 10));
        // Same key, same amount; the digest binds the escrow address (and the id does too).
        vm.prank(payee);
        vm.expectRevert(PaymentChannelEscrow.InvalidSignature.selector);
        escrow.settle(id, 10, sig);
        bytes memory crossed = sign(PAYER_KEY, twin.voucherDigest(id, 10));
        vm.prank(payee);
        vm.expectRevert(PaymentChannelEscrow.InvalidSignature.selector);
        escrow.settle(id, 10, crossed);
    }

    function test_settle_revertsOnVoucherFromOtherChain() public {
        bytes32 id = openChannel(DEPOSIT, SALT, address(0));
        uint256 here = block.chainid;
        vm.chainId(here + 1);
        bytes memory foreign = voucher(PAYER_KEY, id, 10);
        vm.chainId(here);
        vm.prank(payee);
        vm.expectRevert(PaymentChannelEscrow.InvalidSignature.selector);
        escrow.settle(id, 10, foreign);
    }

    function test_settle_revertsOnUnknownChannel() public {
        vm.prank(payee);
        vm.expectRevert(PaymentChannelEscrow.ChannelNotFound.selector);
        escrow.settle(keccak256("nope"), 1, "");
    }

    function test_settle_revertsWhenFinalized() public {
        bytes32 id = openChannel(DEPOSIT, SALT, address(0));
        bytes memory sig = voucher(PAYER_KEY, id, 10);
        vm.prank(payee);
        escrow.close(id, 0, "");
        vm.prank(payee);
        vm.expectRevert(PaymentChannelEscrow.ChannelFinalized.selector);
        escrow.settle(id, 10, sig);
    }

    function test_settle_succeedsDuringGracePeriod() public {
        bytes32 id = openChannel(DEPOSIT, SALT, address(0));
        vm.prank(payer);
        escrow.requestClose(id);
        vm.warp(block.timestamp + 15 minutes - 1);
        payeeSettles(id, 10);
        vm.assertEq(token.balanceOf(payee), 10, "paid");
    }

    function testFuzz_settle_paysExactDelta(uint128 deposit, uint128 first, uint128 second) public {
        deposit = uint128(bound(deposit, 1, 1_000_000e6));
        first = uint128(bound(first, 1, deposit));
        second = uint128(bound(second, 0, deposit));
        bytes32 id = openChannel(deposit, SALT, address(0));
        payeeSettles(id, first);
        bytes memory sig = voucher(PAYER_KEY, id, second);
        if (second <= first) {
            vm.expectRevert(PaymentChannelEscrow.AmountNotIncreasing.selector);
        }
        vm.prank(payee);
        escrow.settle(id, second, sig);
        uint256 top = second > first ? second : first;
        vm.assertEq(token.balanceOf(payee), top, "payee holds the highest settled voucher");
        vm.assertEq(token.balanceOf(address(escrow)), deposit - top, "escrow holds the rest");
    }

    function testFuzz_settle_revertsAboveDeposit(uint128 deposit, uint128 settled, uint128 amount) public {
        deposit = uint128(bound(deposit, 1, 1_000_000e6));
        settled = uint128(bound(settled, 0, deposit));
        amount = uint128(bound(amount, uint256(deposit) + 1, type(uint128).max));
        bytes32 id = openChannel(deposit, SALT, address(0));
        if (settled > 0) {
            payeeSettles(id, settled);
        }
        // A correctly signed voucher: only the deposit cap may stop it.
        bytes memory sig = voucher(PAYER_KEY, id, amount);
        vm.prank(payee);
        vm.expectRevert(PaymentChannelEscrow.AmountExceedsDeposit.selector);
        escrow.settle(id, amount, sig);
        vm.assertEq(escrow.getChannel(id).settled, settled, "settled unchanged");
        vm.assertEq(token.balanceOf(payee), settled, "payee paid nothing more");
        vm.assertEq(token.balanceOf(address(escrow)), deposit - settled, "escrow keeps the rest");
    }

    // ------------------------------------------------------------ close

    function test_close_settlesAndRefunds() public {
        bytes32 id = openChannel(DEPOSIT, SALT, address(0));
        uint256 before = token.balanceOf(payer);
        payeeSettles(id, 100);
        payeeCloses(id, 250);
        PaymentChannelEscrow.Channel memory c = escrow.getChannel(id);
        vm.assertTrue(c.finalized, "finalized");
        vm.assertEq(c.settled, 250, "settled");
        vm.assertEq(token.balanceOf(payee), 250, "payee");
        vm.assertEq(token.balanceOf(payer), before + DEPOSIT - 250, "refund");
        vm.assertEq(token.balanceOf(address(escrow)), 0, "escrow empty");
    }

    function test_close_forfeitsWithoutSignature() public {
        bytes32 id = openChannel(DEPOSIT, SALT, address(0));
        payeeSettles(id, 100);
        vm.prank(payee);
        escrow.close(id, 50, "");
        vm.assertEq(token.balanceOf(payee), 100, "payee keeps settled only");
        vm.assertEq(token.balanceOf(address(escrow)), 0, "escrow empty");
    }

    function test_close_revertsForNonPayee() public {
        bytes32 id = openChannel(DEPOSIT, SALT, address(0));
        vm.prank(payer);
        vm.expectRevert(PaymentChannelEscrow.NotPayee.selector);
        escrow.close(id, 0, "");
    }

    function test_close_revertsAboveDeposit() public {
        bytes32 id = openChannel(DEPOSIT, SALT, address(0));
        bytes memory sig = voucher(PAYER_KEY, id, DEPOSIT + 1);
        vm.prank(payee);
        vm.expectRevert(PaymentChannelEscrow.AmountExceedsDeposit.selector);
        escrow.close(id, DEPOSIT + 1, sig);
    }

    function test_close_revertsOnInvalidSignature() public {
        bytes32 id = openChannel(DEPOSIT, SALT, address(0));
        bytes memory sig = voucher(OTHER_KEY, id, 10);
        vm.prank(payee);
        vm.expectRevert(PaymentChannelEscrow.InvalidSignature.selector);
        escrow.close(id, 10, sig);
    }

    function test_close_revertsOnHighS() public {
        bytes32 id = openChannel(DEPOSIT, SALT, address(0));
        bytes memory sig = highS(voucher(PAYER_KEY, id, 10));
        vm.prank(payee);
        vm.expectRevert(PaymentChannelEscrow.InvalidSignature.selector);
        escrow.close(id, 10, sig);
    }

    function test_close_revertsOnUnknownChannel() public {
        vm.prank(payee);
        vm.expectRevert(PaymentChannelEscrow.ChannelNotFound.selector);
        escrow.close(keccak256("nope"), 0, "");
    }

    function test_close_revertsWhenFinalized() public {
        bytes32 id = openChannel(DEPOSIT, SALT, address(0));
        vm.prank(payee);
        escrow.close(id, 0, "");
        vm.prank(payee);
        vm.expectRevert(PaymentChannelEscrow.ChannelFinalized.selector);
        escrow.close(id, 0, "");
    }

    function testFuzz_close_splitsDeposit(uint128 deposit, uint128 settled, uint128 finalAmount) public {
        deposit = uint128(bound(deposit, 1, 1_000_000e6));
        settled = uint128(bound(settled, 0, deposit));
        finalAmount = uint128(bound(finalAmount, 0, deposit));
        bytes32 id = openChannel(deposit, SALT, address(0));
        if (settled > 0) {
            payeeSettles(id, settled);
        }
        uint256 payerBefore = token.balanceOf(payer);
        bytes memory sig = finalAmount > settled ? voucher(PAYER_KEY, id, finalAmount) : bytes("");
        vm.prank(payee);
        escrow.close(id, finalAmount, sig);
        uint256 paid = finalAmount > settled ? finalAmount : settled;
        vm.assertEq(token.balanceOf(payee), paid, "payee gets max(settled, final)");
        vm.assertEq(token.balanceOf(payer) - payerBefore, deposit - paid, "payer gets the rest");
        vm.assertEq(token.balanceOf(address(escrow)), 0, "nothing left behind");
    }

    function testFuzz_close_revertsAboveDeposit(uint128 deposit, uint128 settled, uint128 amount) public {
        deposit = uint128(bound(deposit, 1, 1_000_000e6));
        settled = uint128(bound(settled, 0, deposit));
        amount = uint128(bound(amount, uint256(deposit) + 1, type(uint128).max));
        bytes32 id = openChannel(deposit, SALT, address(0));
        if (settled > 0) {
            payeeSettles(id, settled);
        }
        uint256 payerBefore = token.balanceOf(payer);
        bytes memory sig = voucher(PAYER_KEY, id, amount);
        vm.prank(payee);
        vm.expectRevert(PaymentChannelEscrow.AmountExceedsDeposit.selector);
        escrow.close(id, amount, sig);
        PaymentChannelEscrow.Channel memory c = escrow.getChannel(id);
        vm.assertFalse(c.finalized, "still open");
        vm.assertEq(c.settled, settled, "settled unchanged");
        vm.assertEq(token.balanceOf(payee), settled, "payee paid nothing more");
        vm.assertEq(token.balanceOf(payer), payerBefore, "no refund");
        vm.assertEq(token.balanceOf(address(escrow)), deposit - settled, "escrow keeps the rest");
    }

    // ------------------------------------------------------------ requestClose

    function test_requestClose_succeeds() public {
        bytes32 id = openChannel(DEPOSIT, SALT, address(0));
        vm.prank(payer);
        escrow.requestClose(id);
        vm.assertEq(escrow.getChannel(id).closeRequestedAt, block.timestamp, "timestamp");
    }

    function test_requestClose_repeatKeepsFirstTimestamp() public {
        bytes32 id = openChannel(DEPOSIT, SALT, address(0));
        vm.prank(payer);
        escrow.requestClose(id);
        uint256 first = block.timestamp;
        vm.warp(first + 100);
        vm.prank(payer);
        escrow.requestClose(id);
        vm.assertEq(escrow.getChannel(id).closeRequestedAt, first, "not extended");
    }

    function test_requestClose_revertsForNonPayer() public {
        bytes32 id = openChannel(DEPOSIT, SALT, address(0));
        vm.prank(payee);
        vm.expectRevert(PaymentChannelEscrow.NotPayer.selector);
        escrow.requestClose(id);
    }

    function test_requestClose_revertsOnUnknownChannel() public {
        vm.prank(payer);
        vm.expectRevert(PaymentChannelEscrow.ChannelNotFound.selector);
        escrow.requestClose(keccak256("nope"));
    }

    function test_requestClose_revertsWhenFinalized() public {
        bytes32 id = openChannel(DEPOSIT, SALT, address(0));
        vm.prank(payee);
        escrow.close(id, 0, "");
        vm.prank(payer);
        vm.expectRevert(PaymentChannelEscrow.ChannelFinalized.selector);
        escrow.requestClose(id);
    }

    // ------------------------------------------------------------ withdraw

    function test_withdraw_revertsOneSecondBeforeGraceEnds() public {
        bytes32 id = requestedClose();
        vm.warp(block.timestamp + 15 minutes - 1);
        vm.prank(payer);
        vm.expectRevert(PaymentChannelEscrow.CloseNotReady.selector);
        escrow.withdraw(id);
    }

    function test_withdraw_succeedsExactlyWhenGraceEnds() public {
        bytes32 id = requestedClose();
        uint256 before = token.balanceOf(payer);
        vm.warp(block.timestamp + 15 minutes);
        vm.prank(payer);
        escrow.withdraw(id);
        vm.assertEq(token.balanceOf(payer) - before, DEPOSIT - 100, "refund of the unsettled remainder");
        vm.assertTrue(escrow.getChannel(id).finalized, "finalized");
    }

    function test_withdraw_succeedsOneSecondAfterGraceEnds() public {
        bytes32 id = requestedClose();
        vm.warp(block.timestamp + 15 minutes + 1);
        vm.prank(payer);
        escrow.withdraw(id);
        vm.assertEq(token.balanceOf(address(escrow)), 0, "escrow empty");
    }

    function test_withdraw_revertsWithoutCloseRequest() public {
        bytes32 id = openChannel(DEPOSIT, SALT, address(0));
        vm.warp(block.timestamp + 365 days);
        vm.prank(payer);
        vm.expectRevert(PaymentChannelEscrow.CloseNotReady.selector);
        escrow.withdraw(id);
    }

    function test_withdraw_revertsForNonPayer() public {
        bytes32 id = requestedClose();
        vm.warp(block.timestamp + 15 minutes);
        vm.prank(payee);
        vm.expectRevert(PaymentChannelEscrow.NotPayer.selector);
        escrow.withdraw(id);
    }

    function test_withdraw_revertsWhenFinalized() public {
        bytes32 id = requestedClose();
        vm.warp(block.timestamp + 15 minutes);
        vm.prank(payer);
        escrow.withdraw(id);
        vm.prank(payer);
        vm.expectRevert(PaymentChannelEscrow.ChannelFinalized.selector);
        escrow.withdraw(id);
    }

    function test_withdraw_revertsAfterCooperativeClose() public {
        bytes32 id = requestedClose();
        vm.prank(payee);
        escrow.close(id, 0, "");
        vm.warp(block.timestamp + 15 minutes);
        vm.prank(payer);
        vm.expectRevert(PaymentChannelEscrow.ChannelFinalized.selector);
        escrow.withdraw(id);
    }

    function test_withdraw_revertsOnUnknownChannel() public {
        vm.prank(payer);
        vm.expectRevert(PaymentChannelEscrow.ChannelNotFound.selector);
        escrow.withdraw(keccak256("nope"));
    }

    /// The close request of `id` is cancelled: past the grace period the payer cannot withdraw.
    function assertCloseCancelled(bytes32 id) internal {
        vm.assertEq(escrow.getChannel(id).closeRequestedAt, 0, "close request cancelled");
        vm.warp(block.timestamp + 15 minutes);
        vm.prank(payer);
        vm.expectRevert(PaymentChannelEscrow.CloseNotReady.selector);
        escrow.withdraw(id);
    }

    /// A top-up of `amount` added its deposit to `id` and left its close request (made at
    /// `requestedAt`) standing.
    function assertToppedUpKeepingClose(bytes32 id, uint128 amount, uint64 requestedAt) internal view {
        PaymentChannelEscrow.Channel memory c = escrow.getChannel(id);
        vm.assertEq(c.deposit, DEPOSIT + amount, "deposit added");
        vm.assertEq(c.closeRequestedAt, requestedAt, "close request kept");
    }

    function assertNoChannel(bytes32 id) internal view {
        PaymentChannelEscrow.Channel memory c = escrow.getChannel(id);
        vm.assertEq(c.payer, address(0), "no channel");
        vm.assertEq(c.deposit, 0, "no deposit");
    }

    /// A channel with 100 settled and a close requested now.
    function requestedClose() internal returns (bytes32 id) {
        id = openChannel(DEPOSIT, SALT, address(0));
        payeeSettles(id, 100);
        vm.prank(payer);
        escrow.requestClose(id);
    }

    /// Signs a voucher first: a prank applies to the next external call, and voucherDigest is one.
    function payeeSettles(bytes32 id, uint128 amount) internal {
        payeeSettles(id, amount, PAYER_KEY);
    }

    function payeeSettles(bytes32 id, uint128 amount, uint256 key) internal {
        bytes memory sig = voucher(key, id, amount);
        vm.prank(payee);
        escrow.settle(id, amount, sig);
    }

    function payeeCloses(bytes32 id, uint128 amount) internal {
        bytes memory sig = voucher(PAYER_KEY, id, amount);
        vm.prank(payee);
        escrow.close(id, amount, sig);
    }

    function bound(uint256 x, uint256 min, uint256 max) internal pure returns (uint256) {
        return min + (x % (max - min + 1));
    }
}
