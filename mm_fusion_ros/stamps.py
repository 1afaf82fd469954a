"""Time stamps are integer nanoseconds everywhere (message stamps, bag record times, OXTS
timestamps), so no float rounding moves a sample from one scan interval to the next; this is
the one conversion factor."""

NS_PER_S = 1_000_000_000
