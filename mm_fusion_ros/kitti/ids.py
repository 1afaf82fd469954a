"""KITTI odometry sequence ids (DESIGN §2: zero-padded, `0,1,8` means 00, 01, 08).

The bottom of kitti/: the odometry layout, the raw OXTS reader and the IMU sources all name
sequences, so the id rules live below all three.
"""


def normalize_sequence_id(seq) -> str:
    """'0' -> '00', 7 -> '07', '10' -> '10'; anything but digits is a ValueError."""
    text = str(seq).strip()
    if not text.isdigit():
        raise ValueError(f'sequence id {seq!r} is not a number (expected e.g. 00, 7, 10)')
    return f'{int(text):02d}'


def parse_sequences(text) -> list:
    """'00,1, 8' -> ['00', '01', '08'] (order kept, duplicates removed)."""
    items = text.split(',') if isinstance(text, str) else list(text)
    out = []
    for item in items:
        if str(item).strip():
            seq = normalize_sequence_id(item)
            if seq not in out:
                out.append(seq)
    if not out:
        raise ValueError(f'no sequence ids in {text!r}')
    return out
