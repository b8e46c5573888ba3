// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {PaymentChannelEscrow} from "../src/PaymentChannelEscrow.sol";
import {TestUSD} from "../src/TestUSD.sol";
import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";

/// @dev The forge cheatcodes these tests use. forge-std's npm build is too old to compile here
/// (it lacks ds-test), so we declare the few cheatcodes we need against forge's own interface.
interface Vm {
    function warp(uint256) external;
    function chainId(uint256) external;
    function sign(uint256 privateKey, bytes32 digest) external pure returns (uint8 v, bytes32 r, bytes32 s);
    function signCompact(uint256 privateKey, bytes32 digest) external pure returns (bytes32 r, bytes32 vs);
    function addr(uint256 privateKey) external pure returns (address);
    function prank(address) external;
    function startPrank(address) external;
    function stopPrank() external;
    function etch(address, bytes calldata) external;
    function expectEmit(address emitter) external;
    function expectRevert(bytes4) external;
    function expectRevert(bytes calldata) external;
    function expectRevert() external;
    function assume(bool) external pure;
    function assertEq(uint256, uint256, string calldata) external pure;
    function assertEq(address, address, string calldata) external pure;
    function assertEq(bytes32, bytes32, string calldata) external pure;
    function assertEq(bytes calldata, bytes calldata, string calldata) external pure;
    function assertTrue(bool, string calldata) external pure;
    function assertFalse(bool, string calldata) external pure;
    function assertLe(uint256, uint256, string calldata) external pure;
}

/// @dev An ERC-1271 wallet that accepts signatures by one owner key.
contract MockWallet {
    address public immutable owner;

    constructor(address owner_) {
        owner = owner_;
    }

    function isValidSignature(bytes32 hash, bytes calldata signature) external view returns (bytes4) {
        if (signature.length != 65) return 0xffffffff;
        (bytes32 r, bytes32 s) = (bytes32(signature[0:32]), bytes32(signature[32:64]));
        address signer = ecrecover(hash, uint8(signature[64]), r, s);
        return signer == owner && signer != address(0) ? bytes4(0x1626ba7e) : bytes4(0xffffffff);
    }
}

/// @dev An ERC-20 with a fallback that takes any call, as WETH9's does (it deposits msg.value):
/// `receiveWithAuthorization` on it "succeeds" and moves nothing.
contract FallbackToken is ERC20 {
    constructor() ERC20("Wrapped", "WRAP") {}

    function mint(address to, uint256 amount) external {
        _mint(to, amount);
    }

    fallback() external payable {}
}

/// @dev An ERC-20 that, once its fee is switched on, burns 1% of every transfer: the recipient
/// gets less than was sent (USDC's contract has such a switch, never used so far).
contract FeeToken is ERC20 {
    bool public charging;

    constructor() ERC20("Fee", "FEE") {}

    function charge(bool on) external {
        charging = on;
    }

    function mint(address to, uint256 amount) external {
        _mint(to, amount);
    }

    function _update(address from, address to, uint256 value) internal override {
        if (!charging || from == address(0) || to == address(0)) return super._update(from, to, value);
        uint256 fee = value / 100;
        super._update(from, address(0), fee);
        super._update(from, to, value - fee);
    }
}

/// @dev An ERC-20 that, once armed, calls back into the escrow from inside a deposit's
/// transferFrom or receiveWithAuthorization: it makes a deposit of its own there (it opens a
/// channel it pays, or tops up one), delivered in full, then delivers the outer deposit short by
/// that amount. Each deposit measures the escrow's balance around its own token call, so the
/// outer one sees the inner one's tokens as its own and both pass: the escrow records `nested`
/// more than it holds, paid later out of other channels of this token.
contract ReentrantToken is ERC20 {
    PaymentChannelEscrow public immutable escrow;
    address public immutable payee;
    uint128 public nested;
    bytes32 public nestedChannel;

    constructor(PaymentChannelEscrow escrow_, address payee_) ERC20("Hook", "HOOK") {
        escrow = escrow_;
        payee = payee_;
        _approve(address(this), address(escrow_), type(uint256).max);
    }

    function mint(address to, uint256 amount) external {
        _mint(to, amount);
    }

    /// @dev The next deposit into the escrow nests a deposit of `amount` paid by this token:
    /// an open of a new channel when `channelId` is zero, else a top-up of that channel.
    function arm(uint128 amount, bytes32 channelId) external {
        nested = amount;
        nestedChannel = channelId;
    }

    /// @dev A channel this token pays, for a nested top-up to add to.
    function openOwn(uint128 deposit, bytes32 salt) external returns (bytes32) {
        return escrow.open(payee, address(this), deposit, salt, address(0));
    }

    /// @dev A deposit: the nested one first, then the rest short by it.
    function transferFrom(address from, address to, uint256 value) public override returns (bool) {
        _spendAllowance(from, msg.sender, value);
        _transfer(from, to, to == address(escrow) ? value - _nest() : value);
        return true;
    }

    /// @dev EIP-3009's USDC overload, without the signature check (the token is the attacker's).
    function receiveWithAuthorization(
        address from,
        address to,
        uint256 value,
        uint256,
        uint256,
        bytes32,
        bytes calldata
    ) external {
        require(msg.sender == to, "caller must be the payee");
        _transfer(from, to, to == address(escrow) ? value - _nest() : value);
    }

    /// @dev A payout (settle, close, withdraw): the nested deposit, then the payout in full.
    function transfer(address to, uint256 value) public override returns (bool) {
        if (msg.sender == address(escrow)) _nest();
        return super.transfer(to, value);
    }

    function _nest() private returns (uint128 amount) {
        amount = nested;
        if (amount == 0) return 0;
        nested = 0;
        if (nestedChannel == bytes32(0)) escrow.open(payee, address(this), amount, bytes32("nested"), address(0));
        else escrow.topUp(nestedChannel, amount);
    }
}

abstract contract Base {
    Vm internal constant vm = Vm(address(uint160(uint256(keccak256("hevm cheat code")))));

    uint256 internal constant HALF_ORDER = 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0;
    uint256 internal constant ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141;

    bytes32 internal constant RECEIVE_TYPEHASH = keccak256(
        "ReceiveWithAuthorization(address from,address to,uint256 value,uint256 validAfter,uint256 validBefore,bytes32 nonce)"
    );
    bytes32 internal constant TRANSFER_TYPEHASH = keccak256(
        "TransferWithAuthorization(address from,address to,uint256 value,uint256 validAfter,uint256 validBefore,bytes32 nonce)"
    );

    PaymentChannelEscrow internal escrow;
    TestUSD internal token;

    uint256 internal constant PAYER_KEY = 0xA11CE;
    uint256 internal constant PAYEE_KEY = 0xB0B;
    uint256 internal constant SIGNER_KEY = 0x5E55;
    uint256 internal constant OTHER_KEY = 0xBAD;
    address internal payer;
    address internal payee;
    address internal signer;
    address internal other;

    function setUp() public virtual {
        escrow = new PaymentChannelEscrow();
        token = new TestUSD();
        payer = vm.addr(PAYER_KEY);
        payee = vm.addr(PAYEE_KEY);
        signer = vm.addr(SIGNER_KEY);
        other = vm.addr(OTHER_KEY);
        token.mint(payer, 1_000_000e6);
        token.mint(other, 1_000_000e6);
        vm.prank(payer);
        token.approve(address(escrow), type(uint256).max);
        vm.prank(other);
        token.approve(address(escrow), type(uint256).max);
        vm.warp(1_700_000_000);
    }

    function openChannel(uint128 deposit, bytes32 salt, address authorizedSigner) internal returns (bytes32) {
        vm.prank(payer);
        return escrow.open(payee, address(token), deposit, salt, authorizedSigner);
    }

    function voucher(uint256 key, bytes32 channelId, uint128 amount) internal view returns (bytes memory) {
        return sign(key, escrow.voucherDigest(channelId, amount));
    }

    function sign(uint256 key, bytes32 digest) internal pure returns (bytes memory) {
        (uint8 v, bytes32 r, bytes32 s) = vm.sign(key, digest);
        return abi.encodePacked(r, s, v);
    }

    /// @dev The same signature with s' = n - s and v flipped: valid for ecrecover, but malleable.
    function highS(bytes memory signature) internal pure returns (bytes memory) {
        bytes32 r;
        bytes32 s;
        uint8 v;
        assembly {
            r := mload(add(signature, 32))
            s := mload(add(signature, 64))
            v := byte(0, mload(add(signature, 96)))
        }
        return abi.encodePacked(r, bytes32(ORDER - uint256(s)), uint8(55 - v));
    }

    function receiveAuthorization(uint256 key, address to, uint256 value, bytes32 nonce)
        internal
        view
        returns (bytes memory)
    {
        return receiveAuthorization(key, to, value, nonce, type(uint256).max);
    }

    function receiveAuthorization(uint256 key, address to, uint256 value, bytes32 nonce, uint256 validBefore)
        internal
        view
        returns (bytes memory)
    {
        address from = vm.addr(key);
        bytes32 structHash = keccak256(abi.encode(RECEIVE_TYPEHASH, from, to, value, uint256(0), validBefore, nonce));
        return sign(key, keccak256(abi.encodePacked(hex"1901", tokenDomainSeparator(), structHash)));
    }

    /// @dev A packed EIP-3009 signature by `key` over any authorization type and validity window.
    function authorization(
        bytes32 typehash,
        uint256 key,
        address to,
        uint256 value,
        uint256 validAfter,
        uint256 validBefore,
        bytes32 nonce
    ) internal view returns (bytes memory) {
        return sign(key, authorizationDigest(typehash, vm.addr(key), to, value, validAfter, validBefore, nonce));
    }

    /// @dev The TestUSD EIP-712 digest of an EIP-3009 transfer or receive authorization.
    function authorizationDigest(
        bytes32 typehash,
        address from,
        address to,
        uint256 value,
        uint256 validAfter,
        uint256 validBefore,
        bytes32 nonce
    ) internal view returns (bytes32) {
        bytes32 structHash = keccak256(abi.encode(typehash, from, to, value, validAfter, validBefore, nonce));
        return keccak256(abi.encodePacked(hex"1901", tokenDomainSeparator(), structHash));
    }

    function tokenDomainSeparator() internal view returns (bytes32) {
        (, string memory name, string memory version, uint256 chainId, address verifyingContract,,) =
            token.eip712Domain();
        return keccak256(
            abi.encode(
                keccak256("EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"),
                keccak256(bytes(name)),
                keccak256(bytes(version)),
                chainId,
                verifyingContract
            )
        );
    }
}
