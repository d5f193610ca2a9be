"""The frames of the replica -> gateway output socket (cluster/engine/output_socket.py writes them,
cluster/gateway/replica_channel.py reads them): a 4-byte big-endian length, then a pickle of a list
of OutputDelta | RequestFailed. Before the first frame the gateway sends its channel id and a
newline, and the replica answers HELLO_OK. Both ends run this package's code; clients never send
or receive these frames."""

import pickle
import struct

FRAME_HEADER = struct.Struct("!I")
HELLO_OK = b"ok\n"
MAX_CHANNEL_ID = 128


def encode_frame(items: list) -> bytes:
    data = pickle.dumps(items, protocol=pickle.HIGHEST_PROTOCOL)
    return FRAME_HEADER.pack(len(data)) + data


def decode_frame(data: bytes) -> list:
    return pickle.loads(data)
