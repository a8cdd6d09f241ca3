// The redis crate: read `key` through the cache, filling it from `load()` only while the lease holds.
async fn cached<F, Fut>(
    redis: &mut redis::aio::MultiplexedConnection,
    key: &str,
    load: F,
) -> redis::RedisResult<String>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = String>,
{
    for _ in 0..50 {
        let (tag, value): (String, redis::Value) = redis::cmd("FCALL")
            .arg("invalidator_get").arg(1).arg(key).arg(2000)
            .query_async(redis).await?;
        match tag.as_str() {
            "hit" => return Ok(redis::from_redis_value(value)?),
            "fill" => {
                let token: String = redis::from_redis_value(value)?;
                let fresh = load().await;
                // 0: invalidated while we read (or the lease expired); the value is still right to use.
                let _stored: i64 = redis::cmd("FCALL")
                    .arg("invalidator_fill").arg(1).arg(key).arg(token).arg(&fresh).arg(60_000)
                    .query_async(redis).await?;
                return Ok(fresh);
            }
            _ => {
                let ms: u64 = redis::from_redis_value(value)?;
                tokio::time::sleep(std::time::Duration::from_millis(ms.min(50))).await;
            }
        }
    }
    Ok(load().await) // another reader holds the lease for long: read without filling
}
