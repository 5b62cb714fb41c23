"""The Lua scripts behind ``fleet.execution.RedisExecutionStore``: each step is one atomic call.

Keys and arguments are described above each script; a step's semantics are in
``fleet.execution.ExecutionStore``'s docstrings.
"""

from __future__ import annotations

__all__ = ["FINISH", "PUT_STATUS", "REFRESH", "RELEASE", "TRY_CLAIM"]

# Writes a StatusRecord (key, value, TTL in ms or 0) unless it says SUCCESS already, and
# publishes it, as Celery's RedisBackend.set does (SET PX + PUBLISH on the key's channel).
PUT_STATUS = """
local function put_status(key, value, ttl)
  local current = redis.call('get', key)
  if current then
    local ok, meta = pcall(cjson.decode, current)
    if ok and type(meta) == 'table' and meta['status'] == 'SUCCESS' then
      return
    end
  end
  if tonumber(ttl) > 0 then
    redis.call('set', key, value, 'px', ttl)
  else
    redis.call('set', key, value)
  end
  redis.call('publish', key, value)
end
"""
# Admits one or more deliveries. KEYS, seven per task: claim, done, deliveries, attempts,
# error, dead (the _FIELDS order), then the StatusRecord's key (any key when there is none).
# ARGV: holder, claim TTL (ms), record TTL (ms), max attempts, then two per task: the
# status value ('' for none) and its TTL (ms).
# Returns one {seen, attempt, payload, claim pttl} per task; a false element comes back None.
TRY_CLAIM = (
    PUT_STATUS
    + """
local function claim(k, a)
  redis.call('incr', KEYS[k + 3])
  redis.call('pexpire', KEYS[k + 3], ARGV[3])
  local done = redis.call('get', KEYS[k + 2])
  if done then
    return {'done', 0, done, false}
  end
  if not redis.call('set', KEYS[k + 1], ARGV[1], 'nx', 'px', ARGV[2]) then
    return {'held', 0, false, redis.call('pttl', KEYS[k + 1])}
  end
  local dead = redis.call('get', KEYS[k + 6])
  if dead then
    redis.call('del', KEYS[k + 1])
    return {'dead', 0, dead, false}
  end
  local attempt = redis.call('incr', KEYS[k + 4])
  redis.call('pexpire', KEYS[k + 4], ARGV[3])
  local err = false
  if attempt > tonumber(ARGV[4]) then
    err = redis.call('get', KEYS[k + 5])
  elseif ARGV[a] ~= '' then
    put_status(KEYS[k + 7], ARGV[a], ARGV[a + 1])
  end
  return {'claimed', attempt, err, false}
end
local out = {}
for i = 0, #KEYS / 7 - 1 do
  out[i + 1] = claim(i * 7, 5 + 2 * i)
end
return out
"""
)
REFRESH = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""
# KEYS: claim, done[, the StatusRecord's key]. ARGV: holder, result, record TTL (ms)[,
# status value, status TTL (ms)].
FINISH = (
    PUT_STATUS
    + """
redis.call('set', KEYS[2], ARGV[2], 'px', ARGV[3])
if redis.call('get', KEYS[1]) == ARGV[1] then
  redis.call('del', KEYS[1])
end
if KEYS[3] then
  put_status(KEYS[3], ARGV[4], ARGV[5])
end
return 1
"""
)
