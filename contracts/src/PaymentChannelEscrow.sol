// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";
import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {SignatureChecker} from "@openzeppelin/contracts/utils/cryptography/SignatureChecker.sol";
import {ReentrancyGuardTransient} from "@openzeppelin/contracts/utils/ReentrancyGuardTransient.sol";

/// @dev The USDC v2.2 `bytes signature` overload of EIP-3009 `receiveWithAuthorization`.
interface IERC3009Receive {
    function receiveWithAuthorization(
        address from,
        address to,
        uint256 value,
        uint256 validAfter,
        uint256 validBefore,
        bytes32 nonce,
        bytes calldata signature
    ) external;
}

/// @title PaymentChannelEscrow
/// @notice Unidirectional payment channels for MPP method `evm`, intent `session`
/// (draft-evm-session-00): the mandatory core plus the EIP-3009 half of the relayed profile.
/// @dev Channel records are never deleted and `finalized` is sticky, so a used channelId can never
/// be re-opened and old vouchers can never be replayed against a new deposit. Every function
/// follows checks-effects-interactions. Only well-behaved ERC-20s (no fee-on-transfer, no
/// rebasing, no transfer callbacks) may be used: every deposit and top-up reverts unless the
/// escrow's balance grew by exactly its amount, which refuses a fee-on-transfer token and a token
/// that swallows the EIP-3009 call, but cannot see a balance that later rebases. Every function
/// that calls the token is `nonReentrant` (one transient-storage flag for all of them), so no
/// escrow call runs inside another: a token that calls back into the escrow reverts. Deposits
/// need it (see _checkReceived); settle, close and withdraw change state before they transfer
/// and would be safe without it, but at about 490 gas a call it keeps them safe from a later
/// change that transfers first, and no ERC-20 this escrow accepts calls back.
contract PaymentChannelEscrow is EIP712, ReentrancyGuardTransient {
    using SafeERC20 for IERC20;

    struct Channel {
        address payer;
        address payee;
        address token;
        address authorizedSigner;
        uint128 deposit;
        uint128 settled;
        uint64 closeRequestedAt;
        bool finalized;
    }

    /// @notice Time the payee has to settle after the payer requests a forced close.
    uint64 public constant CLOSE_GRACE_PERIOD = 15 minutes;

    bytes32 public constant VOUCHER_TYPEHASH = keccak256("Voucher(bytes32 channelId,uint128 cumulativeAmount)");

    /// @dev secp256k1 order / 2: signatures with a larger `s` are malleable copies.
    uint256 private constant HALF_ORDER = 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0;

    mapping(bytes32 channelId => Channel) private _channels;

    event ChannelOpened(
        bytes32 indexed channelId,
        address indexed payer,
        address indexed payee,
        address token,
        address authorizedSigner,
        bytes32 salt,
        uint128 deposit
    );
    event ToppedUp(bytes32 indexed channelId, address indexed from, uint128 additionalDeposit, uint128 deposit);
    event Settled(bytes32 indexed channelId, address indexed payee, uint128 cumulativeAmount, uint128 delta);
    event CloseRequested(bytes32 indexed channelId, address indexed payer, uint64 closeRequestedAt);
    event CloseRequestCancelled(bytes32 indexed channelId);
    event ChannelClosed(bytes32 indexed channelId, uint128 settled, uint128 payeeAmount, uint128 refund);
    event Withdrawn(bytes32 indexed channelId, address indexed payer, uint128 refund);

    error ChannelAlreadyExists();
    error ChannelNotFound();
    error ChannelFinalized();
    error NotPayee();
    error NotPayer();
    error AmountNotIncreasing();
    error AmountExceedsDeposit();
    error InvalidSignature();
    error NonceMismatch();
    error CloseNotReady();
    error ZeroDeposit();
    error DepositOverflow();
    error DepositNotReceived();

    constructor() EIP712("EVM Payment Channel", "1") {}

    // ---------------------------------------------------------------- open

    /// @notice Opens a channel funded by the caller, who becomes the payer. Needs a prior approve.
    function open(address payee, address token, uint128 deposit, bytes32 salt, address authorizedSigner)
        external
        nonReentrant
        returns (bytes32 channelId)
    {
        channelId = _create(msg.sender, payee, token, deposit, salt, authorizedSigner);
        uint256 before = IERC20(token).balanceOf(address(this));
        IERC20(token).safeTransferFrom(msg.sender, address(this), deposit);
        _checkReceived(token, before, deposit);
    }

    /// @notice Opens a channel funded by `from` through an EIP-3009 `receiveWithAuthorization`;
    /// anyone may submit it. The nonce binds the authorization to these channel parameters.
    function openWithAuthorization(
        address payee,
        address token,
        uint128 deposit,
        bytes32 salt,
        address authorizedSigner,
        address from,
        uint256 validAfter,
        uint256 validBefore,
        bytes32 nonce,
        bytes calldata signature
    ) external nonReentrant returns (bytes32 channelId) {
        if (nonce != computeOpenNonce(from, payee, token, salt, authorizedSigner)) revert NonceMismatch();
        channelId = _create(from, payee, token, deposit, salt, authorizedSigner);
        uint256 before = IERC20(token).balanceOf(address(this));
        IERC3009Receive(token).receiveWithAuthorization(
            from, address(this), deposit, validAfter, validBefore, nonce, signature
        );
        _checkReceived(token, before, deposit);
    }

    // ---------------------------------------------------------------- topUp

    /// @notice Adds funds from the payer; cancels a pending close request.
    function topUp(bytes32 channelId, uint128 additionalDeposit) external nonReentrant {
        Channel storage channel = _live(channelId);
        if (msg.sender != channel.payer) revert NotPayer();
        _addDeposit(channel, channelId, msg.sender, additionalDeposit, true);
        address token = channel.token;
        uint256 before = IERC20(token).balanceOf(address(this));
        IERC20(token).safeTransferFrom(msg.sender, address(this), additionalDeposit);
        _checkReceived(token, before, additionalDeposit);
    }

    /// @notice Adds funds from `from` through EIP-3009; anyone may submit it. Cancels a pending
    /// close request only when `from` is the payer and `validAfter >= closeRequestedAt`.
    /// @dev Anyone may submit an authorization, so the top-up alone does not show the payer still
    /// wants the channel: a third party's top-up never cancels (it must not keep a payer's channel
    /// open against the payer's will), and neither does one the payer authorized before it asked
    /// to close (the payee may hold an unused one, and would otherwise cancel each close with it,
    /// each time restarting the grace period). The payer signs `validAfter`, and cannot have
    /// signed one at or after a close request that did not exist yet unless it chose to. A top-up
    /// that does not cancel still adds its deposit, which the payer withdraws with the rest.
    function topUpWithAuthorization(
        bytes32 channelId,
        uint128 additionalDeposit,
        address from,
        bytes32 topUpSalt,
        uint256 validAfter,
        uint256 validBefore,
        bytes32 nonce,
        bytes calldata signature
    ) external nonReentrant {
        if (nonce != computeTopUpNonce(channelId, additionalDeposit, from, topUpSalt)) revert NonceMismatch();
        Channel storage channel = _live(channelId);
        bool cancelsClose = from == channel.payer && validAfter >= channel.closeRequestedAt;
        _addDeposit(channel, channelId, from, additionalDeposit, cancelsClose);
        address token = channel.token;
        uint256 before = IERC20(token).balanceOf(address(this));
        IERC3009Receive(token).receiveWithAuthorization(
            from, address(this), additionalDeposit, validAfter, validBefore, nonce, signature
        );
        _checkReceived(token, before, additionalDeposit);
    }

    // ---------------------------------------------------------------- settle / close

    /// @notice Pays the payee up to a signed cumulative amount without closing the channel.
    function settle(bytes32 channelId, uint128 cumulativeAmount, bytes calldata signature) external nonReentrant {
        Channel storage channel = _live(channelId);
        if (msg.sender != channel.payee) revert NotPayee();
        if (cumulativeAmount <= channel.settled) revert AmountNotIncreasing();
        if (cumulativeAmount > channel.deposit) revert AmountExceedsDeposit();
        _verifyVoucher(channel, channelId, cumulativeAmount, signature);

        uint128 delta = cumulativeAmount - channel.settled;
        channel.settled = cumulativeAmount;
        emit Settled(channelId, msg.sender, cumulativeAmount, delta);

        IERC20(channel.token).safeTransfer(msg.sender, delta);
    }

    /// @notice Cooperative close by the payee: settles the final voucher (skipped when
    /// `cumulativeAmount <= settled`, which forfeits the rest) and refunds the remainder.
    function close(bytes32 channelId, uint128 cumulativeAmount, bytes calldata signature) external nonReentrant {
        Channel storage channel = _live(channelId);
        if (msg.sender != channel.payee) revert NotPayee();

        uint128 delta;
        if (cumulativeAmount > channel.settled) {
            if (cumulativeAmount > channel.deposit) revert AmountExceedsDeposit();
            _verifyVoucher(channel, channelId, cumulativeAmount, signature);
            delta = cumulativeAmount - channel.settled;
            channel.settled = cumulativeAmount;
        }
        uint128 refund = channel.deposit - channel.settled;
        channel.finalized = true;
        emit ChannelClosed(channelId, channel.settled, delta, refund);

        IERC20 token = IERC20(channel.token);
        if (delta > 0) token.safeTransfer(channel.payee, delta);
        if (refund > 0) token.safeTransfer(channel.payer, refund);
    }

    // ---------------------------------------------------------------- forced close

    /// @notice Starts the grace period after which the payer may withdraw. A repeated request
    /// keeps the first timestamp, so retrying never extends the payee's window.
    function requestClose(bytes32 channelId) external {
        Channel storage channel = _live(channelId);
        if (msg.sender != channel.payer) revert NotPayer();
        if (channel.closeRequestedAt != 0) return;
        channel.closeRequestedAt = uint64(block.timestamp);
        emit CloseRequested(channelId, msg.sender, uint64(block.timestamp));
    }

    /// @notice Refunds `deposit - settled` to the payer once the grace period has elapsed.
    function withdraw(bytes32 channelId) external nonReentrant {
        Channel storage channel = _live(channelId);
        if (msg.sender != channel.payer) revert NotPayer();
        uint64 requestedAt = channel.closeRequestedAt;
        if (requestedAt == 0 || block.timestamp < uint256(requestedAt) + CLOSE_GRACE_PERIOD) revert CloseNotReady();

        uint128 refund = channel.deposit - channel.settled;
        channel.finalized = true;
        emit Withdrawn(channelId, msg.sender, refund);

        if (refund > 0) IERC20(channel.token).safeTransfer(msg.sender, refund);
    }

    // ---------------------------------------------------------------- views

    /// @notice The channel record; `payer == address(0)` means no such channel.
    function getChannel(bytes32 channelId) external view returns (Channel memory) {
        return _channels[channelId];
    }

    /// @notice channelId = keccak256(abi.encode(payer, payee, token, salt, authorizedSigner, this, chainid)).
    function computeChannelId(address payer, address payee, address token, bytes32 salt, address authorizedSigner)
        public
        view
        returns (bytes32)
    {
        return keccak256(abi.encode(payer, payee, token, salt, authorizedSigner, address(this), block.chainid));
    }

    /// @notice The EIP-3009 nonce `openWithAuthorization` requires.
    function computeOpenNonce(address from, address payee, address token, bytes32 salt, address authorizedSigner)
        public
        pure
        returns (bytes32)
    {
        return keccak256(abi.encode(from, payee, token, salt, authorizedSigner));
    }

    /// @notice The EIP-3009 nonce `topUpWithAuthorization` requires.
    function computeTopUpNonce(bytes32 channelId, uint128 additionalDeposit, address from, bytes32 topUpSalt)
        public
        pure
        returns (bytes32)
    {
        return keccak256(abi.encode(channelId, additionalDeposit, from, topUpSalt));
    }

    /// @notice The EIP-712 domain separator vouchers are signed under.
    function domainSeparator() external view returns (bytes32) {
        return _domainSeparatorV4();
    }

    /// @notice The EIP-712 digest a voucher signature signs.
    function voucherDigest(bytes32 channelId, uint128 cumulativeAmount) public view returns (bytes32) {
        return _hashTypedDataV4(keccak256(abi.encode(VOUCHER_TYPEHASH, channelId, cumulativeAmount)));
    }

    // ---------------------------------------------------------------- internals

    function _create(
        address payer,
        address payee,
        address token,
        uint128 deposit,
        bytes32 salt,
        address authorizedSigner
    ) private returns (bytes32 channelId) {
        if (deposit == 0) revert ZeroDeposit();
        channelId = computeChannelId(payer, payee, token, salt, authorizedSigner);
        // Finalized records stay, so this also rejects re-opening a closed channel.
        if (_channels[channelId].payer != address(0)) revert ChannelAlreadyExists();
        _channels[channelId] = Channel({
            payer: payer,
            payee: payee,
            token: token,
            authorizedSigner: authorizedSigner,
            deposit: deposit,
            settled: 0,
            closeRequestedAt: 0,
            finalized: false
        });
        emit ChannelOpened(channelId, payer, payee, token, authorizedSigner, salt, deposit);
    }

    /// @dev `cancelsClose`: whether this top-up cancels a pending close request (see the callers).
    function _addDeposit(
        Channel storage channel,
        bytes32 channelId,
        address from,
        uint128 additionalDeposit,
        bool cancelsClose
    ) private {
        if (additionalDeposit == 0) revert ZeroDeposit();
        uint256 total = uint256(channel.deposit) + additionalDeposit;
        if (total > type(uint128).max) revert DepositOverflow();
        channel.deposit = uint128(total);
        emit ToppedUp(channelId, from, additionalDeposit, uint128(total));
        if (channel.closeRequestedAt != 0 && cancelsClose) {
            channel.closeRequestedAt = 0;
            emit CloseRequestCancelled(channelId);
        }
    }

    /// @dev The escrow pays every channel out of one balance per token, so a deposit recorded
    /// above what arrived is paid from other payers' money: a fee-on-transfer token delivers less,
    /// and a token with a catch-all fallback (WETH9's) "succeeds" at a `receiveWithAuthorization`
    /// it does not have while moving nothing. The balance is read around one token call, so this
    /// holds only because nothing else runs in between: a deposit nested in that call (a token
    /// hook) would count as this one's, which `nonReentrant` refuses.
    function _checkReceived(address token, uint256 before, uint128 amount) private view {
        if (IERC20(token).balanceOf(address(this)) != before + amount) revert DepositNotReceived();
    }

    /// @dev An existing, unfinalized channel.
    function _live(bytes32 channelId) private view returns (Channel storage channel) {
        channel = _channels[channelId];
        if (channel.payer == address(0)) revert ChannelNotFound();
        if (channel.finalized) revert ChannelFinalized();
    }

    /// @dev EOA (ECDSA, 65 bytes, low-s) or ERC-1271 signer: `authorizedSigner`, else the payer.
    /// 64-byte EIP-2098 signatures are rejected for EOAs (the draft lets us; clients never make them).
    /// The key's own signature is tried first even when the signer's account has code, unlike
    /// SignatureChecker (which asks an account with code only through ERC-1271): an EOA that
    /// delegates through EIP-7702 after signing vouchers would otherwise void them by its
    /// delegate's answer, request a close and withdraw what it spent. A contract created by
    /// CREATE or CREATE2 has no key, so this accepts nothing that a contract wallet did not sign.
    function _verifyVoucher(Channel storage channel, bytes32 channelId, uint128 amount, bytes calldata signature)
        private
        view
    {
        address signer = channel.authorizedSigner == address(0) ? channel.payer : channel.authorizedSigner;
        if (signature.length == 65 && uint256(bytes32(signature[32:64])) > HALF_ORDER) revert InvalidSignature();
        bytes32 digest = voucherDigest(channelId, amount);
        (address recovered, ECDSA.RecoverError err,) = ECDSA.tryRecoverCalldata(digest, signature);
        if (err == ECDSA.RecoverError.NoError && recovered == signer) return;
        if (!SignatureChecker.isValidERC1271SignatureNowCalldata(signer, digest, signature)) revert InvalidSignature();
    }
}
