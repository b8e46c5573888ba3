// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {Base, Vm} from "./Base.sol";
import {PaymentChannelEscrow} from "../src/PaymentChannelEscrow.sol";
import {TestUSD} from "../src/TestUSD.sol";

/// @dev Drives the escrow with random sequences of calls from three payers and one payee, and
/// keeps ghost books of what the payee was promised (vouchers it holds) and what it was paid.
contract Handler {
    Vm internal constant vm = Vm(address(uint160(uint256(keccak256("hevm cheat code")))));

    PaymentChannelEscrow public immutable escrow;
    TestUSD public immutable token;
    address public immutable payee;
    uint256[3] internal payerKeys = [uint256(0xA1), 0xA2, 0xA3];

    bytes32[] public channels;
    mapping(bytes32 => uint256) public payerKeyOf;
    /// The highest voucher the payer has signed (and the payee therefore holds) per channel.
    mapping(bytes32 => uint128) public highestVoucher;
    /// What the payee actually received from each channel.
    mapping(bytes32 => uint256) public paidToPayee;
    uint256 internal salts;

    constructor(PaymentChannelEscrow escrow_, TestUSD token_, address payee_) {
        escrow = escrow_;
        token = token_;
        payee = payee_;
        for (uint256 i = 0; i < payerKeys.length; i++) {
            address payer = vm.addr(payerKeys[i]);
            vm.prank(payer);
            token.approve(address(escrow), type(uint256).max);
        }
    }

    function channelCount() external view returns (uint256) {
        return channels.length;
    }

    function open(uint256 payerSeed, uint128 deposit) external {
        uint256 key = payerKeys[payerSeed % payerKeys.length];
        deposit = uint128(1 + (deposit % 1e12));
        vm.prank(vm.addr(key));
        bytes32 id = escrow.open(payee, address(token), deposit, bytes32(++salts), address(0));
        channels.push(id);
        payerKeyOf[id] = key;
    }

    function topUp(uint256 channelSeed, uint128 amount) external {
        (bytes32 id, bool ok) = pick(channelSeed);
        if (!ok) return;
        amount = uint128(1 + (amount % 1e12));
        vm.prank(vm.addr(payerKeyOf[id]));
        try escrow.topUp(id, amount) {} catch {}
    }

    /// The payer signs a higher cumulative voucher (possibly above the deposit) for the payee.
    function signVoucher(uint256 channelSeed, uint128 increment) external {
        (bytes32 id, bool ok) = pick(channelSeed);
        if (!ok) return;
        uint128 top = highestVoucher[id];
        highestVoucher[id] = top + uint128(1 + (increment % 1e12));
    }

    function settle(uint256 channelSeed, uint128 below) external {
        (bytes32 id, bool ok) = pick(channelSeed);
        if (!ok || highestVoucher[id] == 0) return;
        // The payee holds every voucher up to the highest; it may settle any of them.
        uint128 amount = highestVoucher[id] - (below % highestVoucher[id]);
        bytes memory sig = voucherSig(id, amount, payerKeyOf[id]);
        pay(id, abi.encodeCall(escrow.settle, (id, amount, sig)));
    }

    /// The payee tries an amount above anything signed, with a signature it forged itself.
    function settleForged(uint256 channelSeed, uint128 extra) external {
        (bytes32 id, bool ok) = pick(channelSeed);
        if (!ok) return;
        uint128 amount = highestVoucher[id] + 1 + (extra % 1e12);
        bytes memory sig = voucherSig(id, amount, 0xB0B);
        pay(id, abi.encodeCall(escrow.settle, (id, amount, sig)));
    }

    function close(uint256 channelSeed, bool forfeit) external {
        (bytes32 id, bool ok) = pick(channelSeed);
        if (!ok) return;
        uint128 amount = forfeit ? 0 : highestVoucher[id];
        bytes memory sig = amount == 0 ? bytes("") : voucherSig(id, amount, payerKeyOf[id]);
        pay(id, abi.encodeCall(escrow.close, (id, amount, sig)));
    }

    function requestClose(uint256 channelSeed) external {
        (bytes32 id, bool ok) = pick(channelSeed);
        if (!ok) return;
        vm.prank(vm.addr(payerKeyOf[id]));
        try escrow.requestClose(id) {} catch {}
    }

    function withdraw(uint256 channelSeed) external {
        (bytes32 id, bool ok) = pick(channelSeed);
        if (!ok) return;
        vm.prank(vm.addr(payerKeyOf[id]));
        try escrow.withdraw(id) {} catch {}
    }

    function wait(uint256 seconds_) external {
        vm.warp(block.timestamp + (seconds_ % 20 minutes));
    }

    function pick(uint256 seed) internal view returns (bytes32, bool) {
        if (channels.length == 0) return (bytes32(0), false);
        return (channels[seed % channels.length], true);
    }

    function voucherSig(bytes32 id, uint128 amount, uint256 key) internal view returns (bytes memory) {
        (uint8 v, bytes32 r, bytes32 s) = vm.sign(key, escrow.voucherDigest(id, amount));
        return abi.encodePacked(r, s, v);
    }

    function pay(bytes32 id, bytes memory call) internal {
        uint256 before = token.balanceOf(payee);
        vm.prank(payee);
        (bool success,) = address(escrow).call(call);
        if (success) paidToPayee[id] += token.balanceOf(payee) - before;
    }
}

contract InvariantTest is Base {
    Handler internal handler;

    function setUp() public override {
        super.setUp();
        handler = new Handler(escrow, token, vm.addr(0xB0B));
        for (uint256 key = 0xA1; key <= 0xA3; key++) {
            token.mint(vm.addr(key), 1e30);
        }
    }

    function targetContracts() public view returns (address[] memory targets) {
        targets = new address[](1);
        targets[0] = address(handler);
    }

    /// What the escrow holds is exactly what open channels still owe: sum(deposit - settled).
    function invariant_escrowBalanceEqualsOpenChannelDebt() public view {
        uint256 owed;
        for (uint256 i = 0; i < handler.channelCount(); i++) {
            PaymentChannelEscrow.Channel memory c = escrow.getChannel(handler.channels(i));
            if (!c.finalized) owed += c.deposit - c.settled;
        }
        vm.assertEq(token.balanceOf(address(escrow)), owed, "escrow balance");
    }

    /// The payee never receives more from a channel than the highest voucher it holds.
    function invariant_payeeNeverPaidAboveHighestVoucher() public view {
        uint256 total;
        for (uint256 i = 0; i < handler.channelCount(); i++) {
            bytes32 id = handler.channels(i);
            vm.assertLe(handler.paidToPayee(id), handler.highestVoucher(id), "paid above voucher");
            vm.assertEq(handler.paidToPayee(id), escrow.getChannel(id).settled, "paid equals settled");
            total += handler.paidToPayee(id);
        }
        vm.assertEq(token.balanceOf(handler.payee()), total, "payee balance");
    }
}
