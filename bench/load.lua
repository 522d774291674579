-- wrk script for bench/load.py: each request embeds a sentence no other request sends (the cache
-- never answers), and every thread counts its status codes; done() prints one JSON line.
-- Run: wrk -t2 -c N -d 15s --timeout 120s -s bench/load.lua URL/v1/embeddings -- NONCE
local threads = {}

function setup(thread)
  thread:set("id", #threads + 1)
  table.insert(threads, thread)
end

function init(args)
  nonce = args[1] or tostring(os.time())
  counter = 0
  statuses = {}
  retry_after_missing = 0
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  counter = counter + 1
  local body = string.format(
    '{"input": "load test %s: sentence %d from thread %d about the weather today"}', nonce, counter, id)
  return wrk.format(nil, nil, nil, body)
end

function response(status, headers, body)
  local key = tostring(status)
  statuses[key] = (statuses[key] or 0) + 1
  if status == 429 and headers["Retry-After"] == nil and headers["retry-after"] == nil then
    retry_after_missing = retry_after_missing + 1
  end
end

function done(summary, latency, requests)
  local counts, missing = {}, 0
  for _, thread in ipairs(threads) do
    for key, n in pairs(thread:get("statuses")) do counts[key] = (counts[key] or 0) + n end
    missing = missing + thread:get("retry_after_missing")
  end
  local parts = {}
  for key, n in pairs(counts) do table.insert(parts, string.format('"%s": %d', key, n)) end
  local e = summary.errors
  io.write(string.format(
    'EMBEDQ-LOAD {"requests": %d, "duration_us": %d, "p50_us": %d, "p95_us": %d, "p99_us": %d, ' ..
    '"max_us": %d, "statuses": {%s}, "retry_after_missing": %d, "errors": {"connect": %d, "read": %d, ' ..
    '"write": %d, "timeout": %d}}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(95),
    latency:percentile(99), latency.max, table.concat(parts, ", "), missing,
    e.connect, e.read, e.write, e.timeout))
end
