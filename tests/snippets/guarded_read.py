# redis-py: read `key` through the cache, filling it from `load()` only while the lease holds.
import time


def cached(r, key, load, lease_ms=2000, ttl_ms=60000):
    for _ in range(50):
        tag, value = r.fcall("invalidator_get", 1, key, lease_ms)
        if tag == b"hit":
            return value.decode()
        if tag == b"fill":
            fresh = load()
            # 0: invalidated while we read (or the lease expired); the value is still right to use.
            r.fcall("invalidator_fill", 1, key, value, fresh, ttl_ms)
            return fresh
        time.sleep(min(int(value), 50) / 1000)
    return load()  # another reader holds the lease for long: read without filling
