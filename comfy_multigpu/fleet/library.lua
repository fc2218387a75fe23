#!lua name=comfy_multigpu
-- comfy-multigpu fleet queue: every read-then-write on the shared queue, atomic (Redis Functions).
-- Loaded by fleet/store.py (FUNCTION LOAD REPLACE); the key layout is described there.
-- Keys other than the lanes are reached by name: this library is for a single Redis (or Valkey)
-- server with replicas, not Redis Cluster.

local GROUP = 'workers'
local P = 'cmg:'

local HISTORY_MAX = 10000      -- entries kept, as stock's MAXIMUM_HISTORY_SIZE

local function job_key(id) return P .. 'job:' .. id end

local function now_ms()
  local t = redis.call('TIME')          -- the server's clock: the one stream ids are made of
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function ring_bell(lane)
  redis.call('XADD', P .. 'bell', 'MAXLEN', '~', '1000', '*', 'lane', lane)
end

local function ensure_lane(lane)
  if redis.call('SADD', P .. 'lanes', lane) == 1 or redis.call('EXISTS', lane) == 0 then
    pcall(redis.call, 'XGROUP', 'CREATE', lane, GROUP, '0', 'MKSTREAM')
  end
end

local function drop_entry(lane, entry)
  redis.call('XACK', lane, GROUP, entry)
  redis.call('XDEL', lane, entry)
end

local function history_entry(job, status_json)
  -- a stock-shaped history entry for a prompt that never finished (failed after its attempts)
  local prompt = redis.call('HGET', job, 'record')
  local gpu = redis.call('HGET', job, 'gpu')
  if not gpu or gpu == '' then gpu = 'null' end
  return '{"prompt": ' .. prompt .. ', "outputs": {}, "status": ' .. status_json ..
         ', "meta": {}, "gpu_id": ' .. gpu ..
         ', "node": ' .. cjson.encode(redis.call('HGET', job, 'node') or '') .. '}'
end

local function write_history(id, entry_json)
  redis.call('SET', P .. 'hist:' .. id, entry_json)
  redis.call('ZADD', P .. 'history', redis.call('INCR', P .. 'histseq'), id)
  redis.call('ZREM', P .. 'active', id)
  redis.call('DEL', job_key(id))
  local extra = redis.call('ZCARD', P .. 'history') - HISTORY_MAX
  if extra > 0 then
    for _, old in ipairs(redis.call('ZRANGE', P .. 'history', 0, extra - 1)) do
      redis.call('DEL', P .. 'hist:' .. old)
    end
    redis.call('ZREMRANGEBYRANK', P .. 'history', 0, extra - 1)
  end
end

local function fail_job(id, lane, entry, status_json)
  local job = job_key(id)
  write_history(id, history_entry(job, status_json))
  if entry then drop_entry(lane, entry) end
  redis.call('HINCRBY', P .. 'stats', 'failed', 1)
end

-- enqueue(lane; id, idem, number_sign, fields_json, record_json ([id, prompt, extra_data, outputs]),
--         sensitive_json, home_band ('' : the lane stands), client_id)
-- -> {'ok', number, lane} | {'dup', id, state, number, gpu, node}
local function describe(id)
  local job = job_key(id)
  if redis.call('EXISTS', job) == 1 then
    local f = redis.call('HMGET', job, 'state', 'number', 'gpu', 'node')
    return {'dup', id, f[1], f[2], f[3] or '', f[4] or ''}
  end
  local hist = redis.call('GET', P .. 'hist:' .. id)
  if hist then
    local entry = cjson.decode(hist)
    local gpu = entry['gpu_id']
    if gpu == nil or gpu == cjson.null then gpu = '' end
    return {'dup', id, 'done', tostring(entry['prompt'][1]), tostring(gpu), entry['node'] or ''}
  end
  return nil
end

local function enqueue(keys, args)
  local lane = keys[1]
  local id, idem, sign = args[1], args[2], tonumber(args[3])
  local home_band, client = args[7], args[8]
  local known = describe(id)
  if known then return known end
  if idem ~= '' then
    local first = redis.call('GET', P .. 'idem:' .. idem)
    if first then
      known = describe(first)
      if known then return known end
    end
  end
  if home_band ~= '' and client ~= '' then
    -- the GPU that ran this client's last prompt holds its execution cache: its home lane first
    local home = redis.call('GET', P .. 'home:' .. client)
    local machine = home and string.match(home, '^(.*):[^:]*$')
    if machine and redis.call('EXISTS', P .. 'node:' .. machine) == 1 then
      lane = P .. 'lane:' .. home_band .. ':h:' .. home
    end
  end
  local number = sign * redis.call('INCR', P .. 'number')
  local fields = cjson.decode(args[4])
  local job = job_key(id)
  for k, v in pairs(fields) do redis.call('HSET', job, k, tostring(v)) end
  -- the record is the stock 5-tuple [number, id, prompt, extra_data, outputs]: put the number in
  local record = '[' .. number .. ', ' .. args[5]:sub(2)
  redis.call('HSET', job, 'record', record, 'sensitive', args[6], 'number', number, 'state', 'waiting',
             'lane', lane, 'attempts', 0, 'token', 0)
  if idem ~= '' then redis.call('SET', P .. 'idem:' .. idem, id, 'EX', 86400) end
  ensure_lane(lane)
  local entry = redis.call('XADD', lane, '*', 'job', id)
  redis.call('HSET', job, 'entry', entry)
  redis.call('ZADD', P .. 'active', number, id)
  ring_bell(lane)
  return {'ok', tostring(number), lane}
end

-- take(lanes...; consumer, node, gpu, steal_after_ms, kind_1, kind_2, ...)
-- Lanes are read in the order given (band by band). kind_i '-': a lane of this GPU, read at once;
-- '+c1,c2': another GPU's home lane or a model lane of a model this GPU does not hold, read once its
-- next prompt has waited steal_after_ms, or at once when none of the GPUs it prefers (c1, c2: consumers
-- "<machine>:<gpu>") is idle. Idle consumers are kept in cmg:idle: a call that takes nothing marks its
-- consumer idle (it blocks on the bell next); busy:<consumer> holds the prompt it took.
-- -> {id, token, record, sensitive, lane, entry, attempts} | {'wait', ms until a steal is due (-1: none)}
local function next_age(lane, now)
  local groups = redis.call('XINFO', 'GROUPS', lane)
  for _, g in ipairs(groups) do
    local name, last
    for i = 1, #g, 2 do
      if g[i] == 'name' then name = g[i + 1] elseif g[i] == 'last-delivered-id' then last = g[i + 1] end
    end
    if name == GROUP then
      local nxt = redis.call('XRANGE', lane, '(' .. last, '+', 'COUNT', 1)
      if #nxt == 0 then return -1 end
      local ms = tonumber(string.match(nxt[1][1], '^(%d+)'))
      return now - ms
    end
  end
  return -1
end

local function any_idle(list)
  for consumer in string.gmatch(list or '', '[^,]+') do
    if redis.call('SISMEMBER', P .. 'idle', consumer) == 1 then return true end
  end
  return false
end

local function take(keys, args)
  local consumer, node, gpu = args[1], args[2], args[3]
  local steal_after, now = tonumber(args[4]), now_ms()
  local due = -1
  for i, lane in ipairs(keys) do
    if redis.call('EXISTS', lane) == 1 then
      local kind = args[4 + i] or '-'
      local allowed = kind == '-'
      if not allowed then
        local age = next_age(lane, now)
        if age >= 0 then
          allowed = age >= steal_after or not any_idle(string.sub(kind, 2))
          if not allowed and (due < 0 or steal_after - age < due) then due = steal_after - age end
        end
      end
      while allowed do
        local got = redis.call('XREADGROUP', 'GROUP', GROUP, consumer, 'COUNT', 1, 'STREAMS', lane, '>')
        if not got then break end
        local entry = got[1][2][1]
        local id = entry[2][2]
        local job = job_key(id)
        local f = redis.call('HMGET', job, 'state', 'entry')
        if f[1] == 'waiting' and f[2] == entry[1] then
          local token = redis.call('HINCRBY', job, 'token', 1)
          local attempts = redis.call('HINCRBY', job, 'attempts', 1)
          redis.call('HSET', job, 'state', 'running', 'owner', consumer, 'node', node, 'gpu', gpu,
                     'started_ms', now, 'renewed_ms', now)
          redis.call('SREM', P .. 'idle', consumer)
          redis.call('SET', P .. 'busy:' .. consumer, id)
          local rec = redis.call('HMGET', job, 'record', 'sensitive')
          return {id, token, rec[1], rec[2], lane, entry[1], attempts}
        end
        drop_entry(lane, entry[1])      -- cancelled, finished or superseded: not work
      end
    end
  end
  redis.call('SADD', P .. 'idle', consumer)
  return {'wait', due}
end

-- not_idle(; consumer): this GPU stopped waiting for work (it runs something, or shuts down)
local function not_idle(keys, args)
  return redis.call('SREM', P .. 'idle', args[1])
end

-- renew(lane; id, token, consumer, entry) -> 1 (still ours) | 0 (lost: stop, do not complete)
local function renew(keys, args)
  local lane = keys[1]
  local id, token, consumer, entry = args[1], args[2], args[3], args[4]
  local f = redis.call('HMGET', job_key(id), 'state', 'token', 'owner', 'entry')
  if f[1] ~= 'running' or f[2] ~= token or f[3] ~= consumer or f[4] ~= entry then return 0 end
  local claimed = redis.call('XCLAIM', lane, GROUP, consumer, 0, entry, 'JUSTID')
  if #claimed == 0 then return 0 end
  redis.call('HSET', job_key(id), 'renewed_ms', now_ms())
  return 1
end

-- complete(lane; id, token, consumer, entry, history_json, file_keys_json, client_id, free)
-- The consumer becomes the client's home (its next prompts prefer this GPU, which holds the cache);
-- free = '1': the GPU is idle from now on. -> 'OK' | 'STALE' (fenced: another attempt owns the
-- prompt now; nothing is written)
local function complete(keys, args)
  local lane = keys[1]
  local id, token, consumer, entry = args[1], args[2], args[3], args[4]
  local job = job_key(id)
  local f = redis.call('HMGET', job, 'state', 'token', 'owner', 'entry', 'node')
  if f[1] ~= 'running' or f[2] ~= token or f[3] ~= consumer or f[4] ~= entry then
    redis.call('HINCRBY', P .. 'stats', 'fenced', 1)
    return 'STALE'
  end
  for _, key in ipairs(cjson.decode(args[6])) do redis.call('HSET', P .. 'files', key, f[5]) end
  write_history(id, args[5])
  drop_entry(lane, entry)
  redis.call('HINCRBY', P .. 'stats', 'completed', 1)
  if args[7] ~= '' then redis.call('SET', P .. 'home:' .. args[7], consumer, 'EX', 3600) end
  if redis.call('GET', P .. 'busy:' .. consumer) == id then
    -- (not when the GPU already took its next prompt)
    redis.call('DEL', P .. 'busy:' .. consumer)
    if args[8] == '1' then redis.call('SADD', P .. 'idle', consumer) end
  end
  return 'OK'
end

local function requeue_job(id, lane, entry, reason)
  local job = job_key(id)
  ensure_lane(lane)
  local fresh = redis.call('XADD', lane, '*', 'job', id)
  redis.call('HSET', job, 'state', 'waiting', 'owner', '', 'entry', fresh, 'gpu', '', 'node', '',
             'requeued', reason)
  drop_entry(lane, entry)
  redis.call('HINCRBY', P .. 'stats', 'redelivered', 1)
  ring_bell(lane)
end

-- reap_lane(lane; min_idle_ms, max_attempts, (unused), reaper, consumer_prefix, failure_status_json)
-- Entries leased longer than min_idle_ms without renewal (consumer_prefix set: every entry of those
-- consumers, a restarted machine's own) go back to their lane, or fail after max_attempts starts.
-- -> {id, 'requeued'|'failed', ...}
local function reap_lane(lane, args, out)
  local min_idle, max_attempts, prefix = tonumber(args[1]), tonumber(args[2]), args[5]
  if redis.call('EXISTS', lane) == 0 then return out end
  local entries = {}
  if prefix == '' then
    local got = redis.call('XAUTOCLAIM', lane, GROUP, args[4], min_idle, '0-0', 'COUNT', 100)
    entries = got[2]
  else
    local pending = redis.call('XPENDING', lane, GROUP, '-', '+', 1000)
    local ids = {}
    for _, p in ipairs(pending) do
      if string.sub(p[2], 1, #prefix) == prefix then table.insert(ids, p[1]) end
    end
    if #ids > 0 then
      entries = redis.call('XCLAIM', lane, GROUP, args[4], 0, unpack(ids))
    end
  end
  for _, e in ipairs(entries) do
    if e and e[2] then
      local id = e[2][2]
      local f = redis.call('HMGET', job_key(id), 'state', 'entry', 'attempts')
      if f[1] == 'running' and f[2] == e[1] then
        if tonumber(f[3]) >= max_attempts then
          fail_job(id, lane, e[1], args[6])
          table.insert(out, id); table.insert(out, 'failed')
        else
          requeue_job(id, lane, e[1], 'lease expired')
          table.insert(out, id); table.insert(out, 'requeued')
        end
      else
        drop_entry(lane, e[1])
      end
    elseif e then
      redis.call('XACK', lane, GROUP, e[1])
    end
  end
  return out
end

-- reap(lanes... (none: every lane); the arguments of reap_lane)
local function reap(keys, args)
  local lanes = keys
  if #lanes == 0 then lanes = redis.call('SMEMBERS', P .. 'lanes') end
  local out = {}
  for _, lane in ipairs(lanes) do reap_lane(lane, args, out) end
  return out
end

-- handback(lane; id, token, consumer, entry): a running prompt given back unfinished (shutdown, lost
-- locally): it waits again in its lane without counting an attempt. -> 1 | 0
local function handback(keys, args)
  local lane = keys[1]
  local id, token, consumer, entry = args[1], args[2], args[3], args[4]
  local job = job_key(id)
  local f = redis.call('HMGET', job, 'state', 'token', 'owner', 'entry')
  if f[1] ~= 'running' or f[2] ~= token or f[3] ~= consumer or f[4] ~= entry then return 0 end
  redis.call('HINCRBY', job, 'attempts', -1)
  requeue_job(id, lane, entry, 'handed back')
  return 1
end

-- cancel(; id) -> 1 if a waiting prompt was removed
local function cancel(keys, args)
  local id = args[1]
  local job = job_key(id)
  local f = redis.call('HMGET', job, 'state', 'lane', 'entry')
  if f[1] ~= 'waiting' then return 0 end
  redis.call('XDEL', f[2], f[3])
  redis.call('ZREM', P .. 'active', id)
  redis.call('DEL', job)
  return 1
end

-- fail_waiting(; id, status_json): a waiting prompt that can never run (its machine is absent)
local function fail_waiting(keys, args)
  local id = args[1]
  local f = redis.call('HMGET', job_key(id), 'state', 'lane', 'entry')
  if f[1] ~= 'waiting' then return 0 end
  redis.call('XDEL', f[2], f[3])
  fail_job(id, f[2], nil, args[2])
  return 1
end

-- name_reserve(; key, local_next, block): output numbers [start, start + block) of a (folder, prefix)
-- for one saving node, unique across the fleet -> start
local function name_reserve(keys, args)
  local key, local_next, block = P .. 'names', tonumber(args[2]), tonumber(args[3])
  local start = math.max(tonumber(redis.call('HGET', key, args[1]) or '1'), local_next)
  redis.call('HSET', key, args[1], start + block)
  return start
end

-- name_release(; key, reserved_end, next): the node used numbers below `next`; if nobody reserved after
-- it, the next save continues from there (no gap)
local function name_release(keys, args)
  local key = P .. 'names'
  if tonumber(redis.call('HGET', key, args[1]) or '0') == tonumber(args[2]) then
    redis.call('HSET', key, args[1], args[3])
  end
  return 1
end

redis.register_function('cmg_enqueue', enqueue)
redis.register_function('cmg_take', take)
redis.register_function('cmg_not_idle', not_idle)
redis.register_function('cmg_renew', renew)
redis.register_function('cmg_complete', complete)
redis.register_function('cmg_reap', reap)
redis.register_function('cmg_handback', handback)
redis.register_function('cmg_cancel', cancel)
redis.register_function('cmg_fail_waiting', fail_waiting)
redis.register_function('cmg_name_reserve', name_reserve)
redis.register_function('cmg_name_release', name_release)
