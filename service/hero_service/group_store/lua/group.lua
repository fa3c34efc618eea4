-- Every atomic step of the Redis group store, in one script (one SHA to load): ARGV[1] names the
-- step: join | claim | publish | sigma | renew. The state machine is MemoryBackend's (memory.py), step
-- for step; the protocol around it is GroupStore.join (base.py).
--
-- KEYS: 1 waiting counter (members in open groups: the memory bound), 2 zset of open
-- generations by deadline, 3 hash open generation -> members, 4 hash run -> sigma-bar.
-- ARGV[2] is the key prefix. A generation's keys share the hash tag {digest}; they are named
-- here, so the store targets one Redis (or a primary with replicas), not Redis Cluster.
-- Times are the server's clock (TIME), so replicas' clocks never matter. Numbers go back as
-- strings: a Lua number reply would be truncated to an integer.

local K_WAITING, K_OPEN, K_COUNTS, K_SIGMA = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local op = ARGV[1]
local prefix = ARGV[2]

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local channel = prefix .. ':events'  -- messages: 'closing|digest|gen', 'closed|digest|gen'

local function fmt(x) return string.format('%.17g', x) end

-- The attachments of member ids ARGV[from..] stay taken as delivered for ttl_ms (the step that
-- hands their caller the group's result marks them, so no separate release is needed).
local function mark_delivered(from, ttl_ms)
  for i = from, #ARGV do
    redis.call('SET', prefix .. ':attached:' .. ARGV[i], 'delivered', 'PX', ttl_ms)
  end
end

local function gid_of(digest, gen) return prefix .. ':{' .. digest .. '}:' .. gen end

-- open -> closing; the generation stops counting against the waiting bound, and waiters hear
-- of it (so that, should its closer die, they take over after one lease, not at the deadline).
local function begin_close(gid, partial, lease_until)
  local meta = gid .. ':meta'
  if redis.call('ZREM', K_OPEN, gid) == 1 then
    redis.call('DECRBY', K_WAITING, tonumber(redis.call('HGET', K_COUNTS, gid) or '0'))
    redis.call('HDEL', K_COUNTS, gid)
  end
  local epoch = redis.call('HINCRBY', meta, 'epoch', 1)
  redis.call('HSET', meta, 'state', 'closing', 'partial', partial, 'lease_until', lease_until)
  redis.call('PUBLISH', channel, 'closing|' .. redis.call('HGET', meta, 'slot'))
  return epoch
end

-- The closer gets the members (in join order), the fencing token and the run's sigma-bar.
local function closer_reply(gen, gid, epoch)
  local meta = gid .. ':meta'
  local order = redis.call('LRANGE', gid .. ':order', 0, -1)
  local data = {}
  if #order > 0 then data = redis.call('HMGET', gid .. ':data', unpack(order)) end
  local sigma_ref = redis.call('HGET', K_SIGMA, redis.call('HGET', meta, 'run')) or ''
  return {'closer', gen, '0', tostring(epoch), redis.call('HGET', meta, 'partial'), sigma_ref,
          '', order, data}
end

-- Where a generation stands; closes it at its deadline, takes over an expired lease.
local function status(digest, gen, lease_ms)
  local gid = gid_of(digest, gen)
  local meta = gid .. ':meta'
  local state = redis.call('HGET', meta, 'state')
  if not state then return {'vanished', gen} end
  if state == 'closed' then
    local result = redis.call('GET', gid .. ':result')
    if not result then return {'vanished', gen} end
    return {'closed', gen, '0', '', '', '', result}
  end
  if state == 'open' then
    local deadline = tonumber(redis.call('HGET', meta, 'deadline'))
    if now >= deadline then
      return closer_reply(gen, gid, begin_close(gid, '1', now + lease_ms))
    end
    return {'waiting', gen, tostring(deadline - now)}
  end
  local lease_until = tonumber(redis.call('HGET', meta, 'lease_until'))
  if now >= lease_until then  -- the closer died (or is too slow): take over
    local epoch = redis.call('HINCRBY', meta, 'epoch', 1)
    redis.call('HSET', meta, 'lease_until', now + lease_ms)
    return closer_reply(gen, gid, epoch)
  end
  return {'closing', gen, tostring(lease_until - now)}
end

-- Overdue open generations stop counting even if nobody is left to claim them: they become
-- closing with an expired lease, so a later waiter or re-sent member takes them over.
local function sweep()
  local overdue = redis.call('ZRANGEBYSCORE', K_OPEN, '-inf', now, 'LIMIT', 0, 32)
  for _, gid in ipairs(overdue) do
    if redis.call('HGET', gid .. ':meta', 'state') == 'open' then
      begin_close(gid, '1', 0)
    else
      redis.call('ZREM', K_OPEN, gid)
      redis.call('DECRBY', K_WAITING, tonumber(redis.call('HGET', K_COUNTS, gid) or '0'))
      redis.call('HDEL', K_COUNTS, gid)
    end
  end
end

-- sigma-bar: the rule of base.fold_sigma (first step seeds with its plain mean, then a
-- per-group momentum of momentum ^ (1 / groups_per_step)).
local function fold(run, s, gps_given, momentum, gap_ms, max_gps)
  local sk = prefix .. ':sigstate:' .. run
  local st = redis.call('HMGET', sk, 'groups', 'step', 'last_step', 'last_ms')
  local groups = tonumber(st[1]) or 0
  local step = tonumber(st[2]) or 0
  local last_step = tonumber(st[3]) or 0
  local last_ms = tonumber(st[4]) or 0
  local value = tonumber(redis.call('HGET', K_SIGMA, run))
  if groups > 0 and step > 0 and now - last_ms >= gap_ms then
    last_step = step
    step = 0
  end
  local g = gps_given
  if g == 0 then g = last_step end
  if g == 0 and groups >= max_gps then g = max_gps end
  if value == nil or groups == 0 then
    value = s
  elseif g == 0 or groups < g then
    value = value + (s - value) / (groups + 1)
  else
    local m = momentum ^ (1 / g)
    value = m * value + (1 - m) * s
  end
  redis.call('HSET', K_SIGMA, run, fmt(value))
  redis.call('HSET', sk, 'groups', groups + 1, 'step', step + 1, 'last_step', last_step,
             'last_ms', now)
  return value
end

if op == 'join' then
  local digest, run = ARGV[3], ARGV[4]
  local size, timeout_ms = tonumber(ARGV[5]), tonumber(ARGV[6])
  local lease_ms, ttl_ms, max_waiting = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
  local nonce = ARGV[10]
  -- Attach (base.Attach): slots > 0 means ARGV carries base ids and the join picks the ids.
  local slots, attach_lease, wait_on_contention = tonumber(ARGV[11]), ARGV[12], ARGV[13] == '1'
  local first = 14  -- ARGV[first + 2(i-1)] = member (or base) id, the next one its data
  sweep()
  local base = prefix .. ':{' .. digest .. '}'
  local head = base .. ':head'
  local n = (#ARGV - first + 1) / 2
  local ids = {}
  if slots > 0 then
    local taken, contended = {}, false
    for i = 1, n do
      local b = ARGV[first + 2 * (i - 1)]
      for k = 0, slots - 1 do
        local name = b .. '#' .. k
        if not taken[name] then
          local v = redis.call('GET', prefix .. ':attached:' .. name)
          if not v then
            ids[i] = name
            break
          end
          if v == '1' then contended = true end
        end
      end
      if not ids[i] then return {{'overloaded', '', tostring(slots), 'identical'}} end
      taken[ids[i]] = true
    end
    if contended and wait_on_contention then return {{'contended', ''}} end
  else
    for i = 1, n do ids[i] = ARGV[first + 2 * (i - 1)] end
  end
  local known, new = {}, 0
  for i = 1, n do
    local g = redis.call('GET', base .. ':m:' .. ids[i])
    if g and redis.call('EXISTS', gid_of(digest, g) .. ':meta') == 1 then
      known[i] = g
    else
      known[i] = false
      new = new + 1
    end
  end
  local waiting = tonumber(redis.call('GET', K_WAITING) or '0')
  if new > 0 and waiting + new > max_waiting then
    return {{'overloaded', '', tostring(waiting)}}
  end
  if slots > 0 then
    for i = 1, n do
      redis.call('SET', prefix .. ':attached:' .. ids[i], '1', 'PX', attach_lease)
    end
  end
  local life = timeout_ms + ttl_ms
  local replies = {}
  if slots > 0 then replies[1] = {'ids', unpack(ids)} end
  local at = #replies
  for i = 1, n do
    local mid, blob = ids[i], ARGV[first + 2 * (i - 1) + 1]
    if known[i] then  -- a re-sent member: re-attach, never add it twice
      replies[at + i] = status(digest, known[i], lease_ms)
    else
      local gen = redis.call('HGET', head, 'gen')
      if not (gen and redis.call('HGET', gid_of(digest, gen) .. ':meta', 'state') == 'open') then
        -- The caller's nonce keeps generation names unique across a Redis restart without
        -- persistence (the counter starts again; an old waiter must never mistake the new one
        -- for its own).
        gen = redis.call('HINCRBY', head, 'opened', 1) .. '.' .. nonce
        redis.call('HSET', head, 'gen', gen)
        redis.call('PEXPIRE', head, life)
        local gid = gid_of(digest, gen)
        redis.call('HSET', gid .. ':meta', 'state', 'open', 'run', run, 'size', size,
                   'deadline', now + timeout_ms, 'epoch', 0, 'partial', '0', 'lease_until', 0,
                   'slot', digest .. '|' .. gen)
        redis.call('PEXPIRE', gid .. ':meta', life)
        redis.call('ZADD', K_OPEN, now + timeout_ms, gid)
        redis.call('HSET', K_COUNTS, gid, 0)
      end
      local gid = gid_of(digest, gen)
      local count = redis.call('RPUSH', gid .. ':order', mid)
      redis.call('HSET', gid .. ':data', mid, blob)
      redis.call('PEXPIRE', gid .. ':order', life)
      redis.call('PEXPIRE', gid .. ':data', life)
      redis.call('SET', base .. ':m:' .. mid, gen, 'PX', life + lease_ms)
      redis.call('HINCRBY', K_COUNTS, gid, 1)
      redis.call('INCR', K_WAITING)
      local deadline = tonumber(redis.call('HGET', gid .. ':meta', 'deadline'))
      if count >= size then
        replies[at + i] = closer_reply(gen, gid, begin_close(gid, '0', now + lease_ms))
      elseif now >= deadline then
        replies[at + i] = closer_reply(gen, gid, begin_close(gid, '1', now + lease_ms))
      else
        replies[at + i] = {'waiting', gen, tostring(deadline - now)}
      end
    end
  end
  return replies

elseif op == 'claim' then
  sweep()
  local reply = status(ARGV[3], ARGV[4], tonumber(ARGV[5]))
  if reply[1] == 'closed' then mark_delivered(7, tonumber(ARGV[6])) end
  return reply

elseif op == 'publish' then
  local digest, gen, token, result = ARGV[3], ARGV[4], ARGV[5], ARGV[6]
  local ttl_ms, sigma = tonumber(ARGV[7]), ARGV[8]
  local gid = gid_of(digest, gen)
  local meta = gid .. ':meta'
  local state = redis.call('HGET', meta, 'state')
  if not state then return {'vanished', gen} end
  if state == 'closed' then return status(digest, gen, 0) end
  if state ~= 'closing' or tostring(redis.call('HGET', meta, 'epoch')) ~= token then
    -- A successor holds the lease now: wait for its result.
    local lease_until = tonumber(redis.call('HGET', meta, 'lease_until')) or now
    return {'closing', gen, tostring(math.max(0, lease_until - now))}
  end
  redis.call('SET', gid .. ':result', result, 'PX', ttl_ms)
  redis.call('HSET', meta, 'state', 'closed')
  for _, suffix in ipairs({':meta', ':order', ':data'}) do
    redis.call('PEXPIRE', gid .. suffix, ttl_ms)
  end
  local after = ''
  if sigma ~= '' then
    after = fmt(fold(redis.call('HGET', meta, 'run'), tonumber(sigma), tonumber(ARGV[9]),
                     tonumber(ARGV[10]), tonumber(ARGV[11]), tonumber(ARGV[12])))
  end
  mark_delivered(13, ttl_ms)
  redis.call('PUBLISH', channel, 'closed|' .. digest .. '|' .. gen)
  return {'published', gen, after}

elseif op == 'renew' then
  -- Attachment leases of a parked request, set again (a Redis restarted without its data lost
  -- them) but never over a delivered mark.
  local lease_ms = ARGV[3]
  for i = 4, #ARGV do
    local name = prefix .. ':attached:' .. ARGV[i]
    if redis.call('GET', name) ~= 'delivered' then
      redis.call('SET', name, '1', 'PX', lease_ms)
    end
  end
  return 'ok'

elseif op == 'sigma' then
  local run = ARGV[3]
  local gps, momentum, gap_ms, max_gps = tonumber(ARGV[4]), tonumber(ARGV[5]),
                                         tonumber(ARGV[6]), tonumber(ARGV[7])
  local value = nil
  for i = 8, #ARGV do value = fold(run, tonumber(ARGV[i]), gps, momentum, gap_ms, max_gps) end
  return fmt(value)
end

return redis.error_reply('unknown group store step ' .. tostring(op))
