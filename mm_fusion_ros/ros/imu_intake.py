"""A raw subscription drained in batches: one callback takes every message queued behind the
one the executor handed it (rclpy's own take: `sub.handle.take_message`, as
rclpy.executors.Executor._take_subscription does), so a burst of N small messages costs one
executor wake-up and one handler call instead of N (the IMU at 500 messages/s in a 5x replay;
bench/profile_online.py measures both)."""

MAX_BATCH = 1000   # ros/qos.py's IMU queue depth: one callback takes at most a full queue


def subscribe_batched(node, msg_class, topic: str, qos, handle, max_batch: int = MAX_BATCH,
                      **kwargs):
    """node.create_subscription(..., raw=True) whose `handle` gets a list of serialized
    messages, oldest first, at least one."""
    sub = None

    def callback(raw):
        raws = [raw]
        while len(raws) < max_batch:
            with sub.handle:
                taken = sub.handle.take_message(sub.msg_type, True)
            if taken is None:
                break
            raws.append(taken[0])
        handle(raws)

    sub = node.create_subscription(msg_class, topic, callback, qos, raw=True, **kwargs)
    return sub
