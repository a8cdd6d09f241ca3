#!lua name=invalidator
-- Guarded fill for cache-aside readers (see the README, "Keeping the cache fresh").
--
-- A lease lives in the cache key itself, as a hash with the one field `invalidator_lease`, so
-- every delete of the key (UNLINK by the sidecar, a pattern it resolved, anyone's DEL) also
-- destroys the lease of a fill in flight, and that fill is refused. Being a hash, a lease can
-- never be read as data: GET of a leased key fails with WRONGTYPE, MGET gives nil for it.
--
-- `setup` compares the whole text with the one it would load; VERSION says which is newer.
local VERSION = 2
local FIELD = 'invalidator_lease'

-- Leases issued since the library was loaded on this server; with the server's clock it makes
-- each token unique, even for two leases of one key in the same microsecond.
local issued = 0

-- The most milliseconds a lease or TTL may have: the largest integer a Lua number holds exactly.
-- A larger one reaches Redis as 1e+17 or inf, which PEXPIRE refuses after the lease is written,
-- leaving a lease without expiry that every reader would wait on forever.
local MOST = 9007199254740991

local function integer(value, name, least)
  local n = tonumber(value)
  if n == nil or n ~= math.floor(n) or n < least or n > MOST then
    error({ err = string.format(
      'ERR invalidator: %s must be an integer of milliseconds from %d to %d, not %q',
      name, least, MOST, tostring(value)) })
  end
  return n
end

-- The key's lease token, or nil when it holds no lease (missing, a value, or another type).
local function lease_of(key)
  if redis.call('TYPE', key)['ok'] ~= 'hash' then
    return nil
  end
  local token = redis.call('HGET', key, FIELD)
  if token == false then
    return nil
  end
  return token
end

-- invalidator_get 1 <key> <lease_ms>: ["hit", value] | ["fill", token] | ["wait", ms left]
local function get(keys, args)
  if #keys ~= 1 or #args ~= 1 then
    return redis.error_reply('ERR invalidator_get: expected 1 <key> <lease_ms>')
  end
  local key = keys[1]
  local lease_ms = integer(args[1], 'lease_ms', 1)
  local kind = redis.call('TYPE', key)['ok']
  if kind == 'string' then
    return { 'hit', redis.call('GET', key) }
  end
  if kind == 'none' then
    local now = redis.call('TIME')
    issued = issued + 1
    local token = string.format('%s.%06d.%d', now[1], tonumber(now[2]), issued)
    redis.call('HSET', key, FIELD, token)
    redis.call('PEXPIRE', key, lease_ms)
    return { 'fill', token }
  end
  if lease_of(key) ~= nil then
    -- Never 0: a caller that sleeps for the answer should sleep at least a millisecond.
    return { 'wait', math.max(redis.call('PTTL', key), 1) }
  end
  return redis.error_reply('WRONGTYPE invalidator_get: the key holds a ' .. kind
    .. ', not a cached string value or a lease')
end

-- invalidator_fill 1 <key> <token> <value> <ttl_ms>: 1 stored | 0 refused
local function fill(keys, args)
  if #keys ~= 1 or #args ~= 3 then
    return redis.error_reply('ERR invalidator_fill: expected 1 <key> <token> <value> <ttl_ms>')
  end
  local key, token, value = keys[1], args[1], args[2]
  local ttl_ms = integer(args[3], 'ttl_ms', 0)
  if lease_of(key) ~= token then
    return 0
  end
  if ttl_ms == 0 then
    redis.call('SET', key, value)
  else
    redis.call('SET', key, value, 'PX', ttl_ms)
  end
  return 1
end

redis.register_function('invalidator_get', get)
redis.register_function('invalidator_fill', fill)
redis.register_function {
  function_name = 'invalidator_version',
  callback = function() return VERSION end,
  flags = { 'no-writes' },
}
