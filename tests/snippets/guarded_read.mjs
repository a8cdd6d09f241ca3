// ioredis: read `key` through the cache, filling it from `load()` only while the lease holds.
export async function cached(redis, key, load, { leaseMs = 2000, ttlMs = 60000 } = {}) {
  for (let attempt = 0; attempt < 50; attempt++) {
    const [tag, value] = await redis.fcall("invalidator_get", 1, key, leaseMs);
    if (tag === "hit") return value;
    if (tag === "fill") {
      const fresh = await load();
      // 0: invalidated while we read (or the lease expired); the value is still right to use.
      await redis.fcall("invalidator_fill", 1, key, value, fresh, ttlMs);
      return fresh;
    }
    await new Promise((resolve) => setTimeout(resolve, Math.min(Number(value), 50)));
  }
  return load(); // another reader holds the lease for long: read without filling
}
