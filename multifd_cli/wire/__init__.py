"""The multifd wire protocol, sans-IO: messages, their codec, and the one table of legal orders.

Import it as ``from multifd_cli import wire as P``; nothing here touches a socket,
a process or a file.
"""

from multifd_cli.wire.codec import (
    ABORT as ABORT,
)
from multifd_cli.wire.codec import (
    ACCEPT as ACCEPT,
)
from multifd_cli.wire.codec import (
    ACCEPT_RESUME as ACCEPT_RESUME,
)
from multifd_cli.wire.codec import (
    ALWAYS as ALWAYS,
)
from multifd_cli.wire.codec import (
    AUTH_CHALLENGE as AUTH_CHALLENGE,
)
from multifd_cli.wire.codec import (
    AUTH_OK as AUTH_OK,
)
from multifd_cli.wire.codec import (
    AUTH_RESPONSE as AUTH_RESPONSE,
)
from multifd_cli.wire.codec import (
    BLOCK_SIZE as BLOCK_SIZE,
)
from multifd_cli.wire.codec import (
    COMPLETE as COMPLETE,
)
from multifd_cli.wire.codec import (
    COMPRESSION_AUTO as COMPRESSION_AUTO,
)
from multifd_cli.wire.codec import (
    CONFIG as CONFIG,
)
from multifd_cli.wire.codec import (
    DIGEST as DIGEST,
)
from multifd_cli.wire.codec import (
    DIGEST_LEN as DIGEST_LEN,
)
from multifd_cli.wire.codec import (
    EPOCH_END as EPOCH_END,
)
from multifd_cli.wire.codec import (
    EPOCH_START as EPOCH_START,
)
from multifd_cli.wire.codec import (
    FEATURE_PSK as FEATURE_PSK,
)
from multifd_cli.wire.codec import (
    FLAG_RAW as FLAG_RAW,
)
from multifd_cli.wire.codec import (
    FLAG_SYNC as FLAG_SYNC,
)
from multifd_cli.wire.codec import (
    HASH as HASH,
)
from multifd_cli.wire.codec import (
    HEADER as HEADER,
)
from multifd_cli.wire.codec import (
    HEADER_CRC_SPAN as HEADER_CRC_SPAN,
)
from multifd_cli.wire.codec import (
    HEADER_SIZE as HEADER_SIZE,
)
from multifd_cli.wire.codec import (
    HELLO as HELLO,
)
from multifd_cli.wire.codec import (
    KIND_BLOB as KIND_BLOB,
)
from multifd_cli.wire.codec import (
    KIND_PAGES as KIND_PAGES,
)
from multifd_cli.wire.codec import (
    KNOWN_FLAGS as KNOWN_FLAGS,
)
from multifd_cli.wire.codec import (
    LAYOUT_BLOCK as LAYOUT_BLOCK,
)
from multifd_cli.wire.codec import (
    LAYOUT_COUNT as LAYOUT_COUNT,
)
from multifd_cli.wire.codec import (
    MAC_LEN as MAC_LEN,
)
from multifd_cli.wire.codec import (
    MAGIC as MAGIC,
)
from multifd_cli.wire.codec import (
    MAX_ABORT_MESSAGE as MAX_ABORT_MESSAGE,
)
from multifd_cli.wire.codec import (
    MAX_BLOCK_SIZE as MAX_BLOCK_SIZE,
)
from multifd_cli.wire.codec import (
    MAX_BLOCKS as MAX_BLOCKS,
)
from multifd_cli.wire.codec import (
    MAX_CHANNELS as MAX_CHANNELS,
)
from multifd_cli.wire.codec import (
    MAX_CONTROL_PAYLOAD as MAX_CONTROL_PAYLOAD,
)
from multifd_cli.wire.codec import (
    MAX_NAME_LEN as MAX_NAME_LEN,
)
from multifd_cli.wire.codec import (
    MAX_PACKET_SIZE as MAX_PACKET_SIZE,
)
from multifd_cli.wire.codec import (
    MAX_PAGE_SIZE as MAX_PAGE_SIZE,
)
from multifd_cli.wire.codec import (
    MAX_PAGES_PER_PACKET as MAX_PAGES_PER_PACKET,
)
from multifd_cli.wire.codec import (
    MAX_RESUME_HASHES as MAX_RESUME_HASHES,
)
from multifd_cli.wire.codec import (
    MAX_XATTR_VALUE as MAX_XATTR_VALUE,
)
from multifd_cli.wire.codec import (
    MAX_XATTRS as MAX_XATTRS,
)
from multifd_cli.wire.codec import (
    METADATA as METADATA,
)
from multifd_cli.wire.codec import (
    MIN_PAGE_SIZE as MIN_PAGE_SIZE,
)
from multifd_cli.wire.codec import (
    NONCE_LEN as NONCE_LEN,
)
from multifd_cli.wire.codec import (
    OFFSET as OFFSET,
)
from multifd_cli.wire.codec import (
    RESUME_HASHES as RESUME_HASHES,
)
from multifd_cli.wire.codec import (
    ROLE_MAIN as ROLE_MAIN,
)
from multifd_cli.wire.codec import (
    START as START,
)
from multifd_cli.wire.codec import (
    SYNC_COUNTS as SYNC_COUNTS,
)
from multifd_cli.wire.codec import (
    TRANSITIONS as TRANSITIONS,
)
from multifd_cli.wire.codec import (
    UUID_LEN as UUID_LEN,
)
from multifd_cli.wire.codec import (
    VERSION as VERSION,
)
from multifd_cli.wire.codec import (
    WELCOME as WELCOME,
)
from multifd_cli.wire.codec import (
    XATTR as XATTR,
)
from multifd_cli.wire.codec import (
    Abort as Abort,
)
from multifd_cli.wire.codec import (
    Accept as Accept,
)
from multifd_cli.wire.codec import (
    AuthChallenge as AuthChallenge,
)
from multifd_cli.wire.codec import (
    AuthOk as AuthOk,
)
from multifd_cli.wire.codec import (
    AuthResponse as AuthResponse,
)
from multifd_cli.wire.codec import (
    BlockInfo as BlockInfo,
)
from multifd_cli.wire.codec import (
    Buffer as Buffer,
)
from multifd_cli.wire.codec import (
    Complete as Complete,
)
from multifd_cli.wire.codec import (
    Config as Config,
)
from multifd_cli.wire.codec import (
    Conversation as Conversation,
)
from multifd_cli.wire.codec import (
    Counts as Counts,
)
from multifd_cli.wire.codec import (
    Decoder as Decoder,
)
from multifd_cli.wire.codec import (
    Digest as Digest,
)
from multifd_cli.wire.codec import (
    EpochEnd as EpochEnd,
)
from multifd_cli.wire.codec import (
    EpochStart as EpochStart,
)
from multifd_cli.wire.codec import (
    Header as Header,
)
from multifd_cli.wire.codec import (
    Heartbeat as Heartbeat,
)
from multifd_cli.wire.codec import (
    Hello as Hello,
)
from multifd_cli.wire.codec import (
    Layout as Layout,
)
from multifd_cli.wire.codec import (
    Limits as Limits,
)
from multifd_cli.wire.codec import (
    Message as Message,
)
from multifd_cli.wire.codec import (
    Metadata as Metadata,
)
from multifd_cli.wire.codec import (
    MsgType as MsgType,
)
from multifd_cli.wire.codec import (
    Packet as Packet,
)
from multifd_cli.wire.codec import (
    ResumeHashes as ResumeHashes,
)
from multifd_cli.wire.codec import (
    State as State,
)
from multifd_cli.wire.codec import (
    Sync as Sync,
)
from multifd_cli.wire.codec import (
    Welcome as Welcome,
)
from multifd_cli.wire.codec import (
    check_block_name as check_block_name,
)
from multifd_cli.wire.codec import (
    check_block_names as check_block_names,
)
from multifd_cli.wire.codec import (
    check_config as check_config,
)
from multifd_cli.wire.codec import (
    check_packet as check_packet,
)
from multifd_cli.wire.codec import (
    encode_abort as encode_abort,
)
from multifd_cli.wire.codec import (
    encode_accept as encode_accept,
)
from multifd_cli.wire.codec import (
    encode_auth_challenge as encode_auth_challenge,
)
from multifd_cli.wire.codec import (
    encode_auth_ok as encode_auth_ok,
)
from multifd_cli.wire.codec import (
    encode_auth_response as encode_auth_response,
)
from multifd_cli.wire.codec import (
    encode_complete as encode_complete,
)
from multifd_cli.wire.codec import (
    encode_config as encode_config,
)
from multifd_cli.wire.codec import (
    encode_digest as encode_digest,
)
from multifd_cli.wire.codec import (
    encode_epoch_end as encode_epoch_end,
)
from multifd_cli.wire.codec import (
    encode_epoch_start as encode_epoch_start,
)
from multifd_cli.wire.codec import (
    encode_header as encode_header,
)
from multifd_cli.wire.codec import (
    encode_heartbeat as encode_heartbeat,
)
from multifd_cli.wire.codec import (
    encode_hello as encode_hello,
)
from multifd_cli.wire.codec import (
    encode_layout as encode_layout,
)
from multifd_cli.wire.codec import (
    encode_metadata as encode_metadata,
)
from multifd_cli.wire.codec import (
    encode_packet as encode_packet,
)
from multifd_cli.wire.codec import (
    encode_resume_hashes as encode_resume_hashes,
)
from multifd_cli.wire.codec import (
    encode_sync as encode_sync,
)
from multifd_cli.wire.codec import (
    encode_welcome as encode_welcome,
)
from multifd_cli.wire.codec import (
    event_name as event_name,
)
from multifd_cli.wire.codec import (
    page_length as page_length,
)
from multifd_cli.wire.codec import (
    page_size_ok as page_size_ok,
)
from multifd_cli.wire.codec import (
    parse_control as parse_control,
)
from multifd_cli.wire.codec import (
    parse_header as parse_header,
)
from multifd_cli.wire.codec import (
    parse_packet_body as parse_packet_body,
)
