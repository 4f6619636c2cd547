"""The Lua scripts of the cluster's reaper (``regmirror.expiry.clusterreaper``): taking
or renewing the leader lease with its fencing token, and claiming a batch of digests
for deletion only while that token still leads (run atomically by Redis)."""

from __future__ import annotations

# ARGV: prefix, replica, lease (ms), the token this replica holds (or ""). Returns the
# leader value held now by this replica, or false.
LEAD = """
local key = ARGV[1] .. ':reaper'
local held = redis.call('GET', key)
if held then
  if held == ARGV[2] .. ' ' .. ARGV[4] then
    redis.call('PEXPIRE', key, ARGV[3])
    return held
  end
  return false
end
local counter = ARGV[1] .. ':reaper:token'
if redis.call('EXISTS', counter) == 0 then
  redis.call('SET', counter, redis.call('TIME')[1])
end
local value = ARGV[2] .. ' ' .. redis.call('INCR', counter)
redis.call('SET', key, value, 'PX', ARGV[3])
return value
"""

# ARGV: prefix, the leader value, mode ("due": expired or evicted; "orphan": only if no
# manifest references it), digests. Refuses unless the caller leads; removes from the
# ledger every digest nobody reads; returns {"kind digest"...} claimed and the blobs
# that no manifest references any more.
CLAIM = """
local p = ARGV[1]
if redis.call('GET', p .. ':reaper') ~= ARGV[2] then
  return redis.error_reply('FENCED another reaper leads now')
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local claimed, orphans = {}, {}
for i = 4, #ARGV do
  local d = ARGV[i]
  local entry = redis.call('HGET', p .. ':entries', d)
  if entry then
    local readers = p .. ':readers|' .. d
    redis.call('ZREMRANGEBYSCORE', readers, '-inf', now)
    local busy = redis.call('ZCARD', readers) > 0
    if not busy and ARGV[3] == 'orphan' and redis.call('SCARD', p .. ':refs|' .. d) > 0 then
      busy = true
    end
    if not busy then
      redis.call('HDEL', p .. ':entries', d)
      redis.call('ZREM', p .. ':lastuse', d)
      redis.call('DECRBY', p .. ':usage', tonumber(string.match(entry, ' (%d+)$')))
      for _, ref in ipairs(redis.call('SMEMBERS', p .. ':entryrefs|' .. d)) do
        redis.call('SREM', p .. ':refs|' .. ref, d)
        if redis.call('SCARD', p .. ':refs|' .. ref) == 0
            and redis.call('HEXISTS', p .. ':entries', ref) == 1 then
          table.insert(orphans, ref)
        end
      end
      redis.call('DEL', p .. ':entryrefs|' .. d)
      table.insert(claimed, string.match(entry, '^(%S+)') .. ' ' .. d)
    end
  end
end
return {claimed, orphans}
"""
