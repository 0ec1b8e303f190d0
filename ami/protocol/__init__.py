"""The sans-I/O core: frames, keys, counters, messages and topic names.

No sockets, no asyncio, no files, no clock and no randomness of its own:
callers hand in bytes, keys, counters and time, and get bytes or typed
errors back.  Everything else in the project drives these functions.
"""

from .association import (
    Aare,
    Aarq,
    InitiateRequest,
    InitiateResponse,
    build_aare,
    build_aarq,
    decode_initiate_request,
    decode_initiate_response,
    encode_initiate_request,
    encode_initiate_response,
    parse_aare,
    parse_aarq,
)
from .channel import Opener, Sealer
from .cipher import SC_AUTH, SC_AUTH_ENC, TAG_LEN, Suite0Cipher
from .counters import IC_LIMIT, ReceiveCounter, SendCounter
from .errors import (
    ALL_REASONS,
    AssociationRejected,
    AuthenticationFailed,
    CounterExhausted,
    CounterNotReserved,
    ExpiredKey,
    FrameTooLarge,
    KeyLifecycleError,
    MalformedFrame,
    MalformedMessage,
    MessageTooLarge,
    ProtocolError,
    ReplayedFrame,
    UnknownKey,
    UnknownMeter,
    UnsupportedSecurity,
    WrongSegment,
)
from .frames import (
    GENERAL_DED_CIPHERING,
    GENERAL_GLO_CIPHERING,
    GLO_INITIATE_REQUEST,
    GLO_INITIATE_RESPONSE,
    MAX_APDU_SIZE,
    CipheredApdu,
    encode_apdu,
    open_apdu,
    parse_apdu,
    seal_apdu,
)
from .keys import (
    REPROGRAMMABLE,
    TRANSFER_TARGET,
    KeyId,
    KeySlot,
    KeyState,
    KeyType,
    SecretBytes,
    SecuritySetup,
    decode_key_transfer,
    encode_key_transfer,
    key_type_for,
    unwrap_key,
    wrap_key,
)
from .messages import (
    Batch,
    Event,
    GapFillReply,
    GapFillRequest,
    KeyTransfer,
    KeyTransferAck,
    Message,
    ReadReply,
    ReadRequest,
    Reading,
    Release,
    decode_batch,
    decode_message,
    encode_batch,
    encode_message,
)

__all__ = [name for name in dir() if not name.startswith("_")]
