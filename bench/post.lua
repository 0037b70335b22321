-- wrk script for bench/hit_path.py and bench/miss_overhead.py: POSTs a chat completion request on
-- every connection and, when the run ends, prints one machine-readable line:
--   STRATA_WRK {"requests":N,"duration_us":D,"rps":R,"p50_us":..,"p99_us":..,...}
-- Environment:
--   STRATA_BENCH_BODY          the JSON request body (required)
--   STRATA_BENCH_UNIQUE        optional: "1" replaces every "@@N@@" in the body with a new number
--                              per request, so that no two requests are alike (cache misses)
--   STRATA_BENCH_EXPECT_LAYER  optional: "l1", "l2" or "l3"; every response must then carry
--                              X-Strata-Cache: hit and X-Strata-Layer: <layer>
--   STRATA_BENCH_EXPECT_CACHE  optional: every response must carry this X-Strata-Cache value
--                              (e.g. "miss"); implied "hit" by STRATA_BENCH_EXPECT_LAYER
--   STRATA_BENCH_EXPECT_HEADER optional: a header every response must carry (a peer's cache hit,
--                              e.g. LiteLLM's x-litellm-cache-key)
--   STRATA_BENCH_FORBID_HEADER optional: a header no response may carry (a peer's cache miss)
-- Every response is checked (status 2xx, and the cache headers when one is expected), so the
-- cost is the same for every server measured; latency is recorded by wrk before the check runs.

wrk.method = "POST"
wrk.body = os.getenv("STRATA_BENCH_BODY") or error("STRATA_BENCH_BODY is not set")
wrk.headers["Content-Type"] = "application/json"

local function setting(name)
  local value = os.getenv(name)
  if value == "" then
    return nil
  end
  return value
end

local expect_layer = setting("STRATA_BENCH_EXPECT_LAYER")
local expect_cache = setting("STRATA_BENCH_EXPECT_CACHE")
if expect_layer ~= nil then
  expect_cache = "hit"
end
local expect_header = setting("STRATA_BENCH_EXPECT_HEADER")
local forbid_header = setting("STRATA_BENCH_FORBID_HEADER")
local unique = setting("STRATA_BENCH_UNIQUE") == "1"
local template = wrk.body

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  counter = 0
  non_2xx = 0
  not_hit = 0
  wrong_layer = 0
  last_bad = ""
end

local function header(headers, name, lower)
  local value = headers[name] or headers[lower]
  if value ~= nil then
    return value
  end
  for key, v in pairs(headers) do
    if string.lower(key) == lower then
      return v
    end
  end
  return nil
end

if unique then
  function request()
    counter = counter + 1
    local body = string.gsub(template, "@@N@@", tostring(counter))
    return wrk.format(nil, nil, nil, body)
  end
end

function response(status, headers, body)
  if status < 200 or status > 299 then
    non_2xx = non_2xx + 1
    last_bad = "status " .. status
    return
  end
  if expect_header ~= nil and header(headers, expect_header, string.lower(expect_header)) == nil then
    not_hit = not_hit + 1
    last_bad = "no " .. expect_header
    return
  end
  if forbid_header ~= nil and header(headers, forbid_header, string.lower(forbid_header)) ~= nil then
    not_hit = not_hit + 1
    last_bad = "unexpected " .. forbid_header
    return
  end
  if expect_cache ~= nil then
    local cache = header(headers, "X-Strata-Cache", "x-strata-cache")
    if cache ~= expect_cache then
      not_hit = not_hit + 1
      last_bad = "X-Strata-Cache: " .. tostring(cache)
      return
    end
  end
  if expect_layer ~= nil then
    local layer = header(headers, "X-Strata-Layer", "x-strata-layer")
    if layer ~= expect_layer then
      wrong_layer = wrong_layer + 1
      last_bad = "X-Strata-Layer: " .. tostring(layer)
    end
  end
end

function done(summary, latency, requests)
  local bad, miss, wrong, example = 0, 0, 0, ""
  for _, thread in ipairs(threads) do
    bad = bad + (thread:get("non_2xx") or 0)
    miss = miss + (thread:get("not_hit") or 0)
    wrong = wrong + (thread:get("wrong_layer") or 0)
    local last = thread:get("last_bad")
    if last ~= nil and last ~= "" then
      example = last
    end
  end
  local e = summary.errors
  local seconds = summary.duration / 1e6
  io.write(string.format(
    'STRATA_WRK {"requests":%d,"duration_us":%d,"bytes":%d,"rps":%.3f,'
      .. '"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.3f,'
      .. '"connect_errors":%d,"read_errors":%d,"write_errors":%d,"status_errors":%d,'
      .. '"timeouts":%d,"non_2xx":%d,"not_hit":%d,"wrong_layer":%d,"example_bad":"%s"}\n',
    summary.requests, summary.duration, summary.bytes, summary.requests / seconds,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    latency.mean, e.connect, e.read, e.write, e.status, e.timeout, bad, miss, wrong,
    (string.gsub(example, "[%c\"\\]", "?"))))
end
