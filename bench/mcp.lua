-- wrk script: POST one JSON-RPC request per call, as an MCP client would.
--
--   wrk -t1 -c32 -d10s -s bench/mcp.lua URL -- METHOD KEY SESSIONS_FILE [PROTOCOL]
--
-- METHOD: tools/call (the echo tool), tools/list, or raw:FILE (the body is
-- read from FILE).  KEY: the API key sent as X-API-Key ("-": none).
-- SESSIONS_FILE: Mcp-Session-Id values, one a line, used in turn ("-": no
-- session, stateless).  PROTOCOL: the Mcp-Protocol-Version header.
--
-- Each response is checked: status not 2xx, status 503, and 2xx bodies that
-- carry a JSON-RPC error ("error" member) or a tool error ("isError":true)
-- are counted per thread.  done() prints one line starting with
-- "BENCH_JSON " followed by a JSON object: requests, duration, socket
-- errors, the counts above, and latency mean/stdev/max and percentiles in
-- microseconds.

local threads = {}
local counter = 1

function setup(thread)
   thread:set("id", counter)
   counter = counter + 1
   table.insert(threads, thread)
end

local bodies = {
   ["tools/call"] = '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"text":"hello from wrk"}}}',
   ["tools/list"] = '{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{}}',
}

local sessions = {}
local nsessions = 0
local nextSession = 0
local baseHeaders = {}
local body = nil

non2xx = 0
status503 = 0
rpcErrors = 0
toolErrors = 0
responses = 0

local function readLines(path)
   local lines = {}
   local f = assert(io.open(path, "r"))
   for line in f:lines() do
      if #line > 0 then
         table.insert(lines, line)
      end
   end
   f:close()
   return lines
end

function init(args)
   local method = args[1] or "tools/call"
   local key = args[2] or "-"
   local sessionsFile = args[3] or "-"
   local protocol = args[4] or "2025-11-25"
   if string.sub(method, 1, 4) == "raw:" then
      local f = assert(io.open(string.sub(method, 5), "r"))
      body = f:read("*a")
      f:close()
   else
      body = assert(bodies[method], "unknown method " .. method)
   end
   baseHeaders["Content-Type"] = "application/json"
   baseHeaders["Accept"] = "application/json, text/event-stream"
   if key ~= "-" then
      baseHeaders["X-API-Key"] = key
   end
   if sessionsFile ~= "-" then
      sessions = readLines(sessionsFile)
      nsessions = #sessions
      baseHeaders["Mcp-Protocol-Version"] = protocol
      -- threads start at different sessions
      nextSession = (id or 0) % math.max(nsessions, 1)
   end
end

function request()
   if nsessions > 0 then
      nextSession = nextSession % nsessions + 1
      baseHeaders["Mcp-Session-Id"] = sessions[nextSession]
   end
   return wrk.format("POST", nil, baseHeaders, body)
end

function response(status, headers, rbody)
   responses = responses + 1
   if status < 200 or status > 299 then
      non2xx = non2xx + 1
      if status == 503 then
         status503 = status503 + 1
      end
   elseif rbody ~= nil then
      if string.find(rbody, '"error":', 1, true) then
         rpcErrors = rpcErrors + 1
      elseif string.find(rbody, '"isError":true', 1, true) then
         toolErrors = toolErrors + 1
      end
   end
end

function done(summary, latency, requests)
   local n2, s503, rpc, tool, resp = 0, 0, 0, 0, 0
   for _, thread in ipairs(threads) do
      n2 = n2 + thread:get("non2xx")
      s503 = s503 + thread:get("status503")
      rpc = rpc + thread:get("rpcErrors")
      tool = tool + thread:get("toolErrors")
      resp = resp + thread:get("responses")
   end
   local e = summary.errors
   local out = string.format(
      '{"requests":%d,"duration_us":%d,"bytes":%d,"responses":%d,'
         .. '"non2xx":%d,"status503":%d,"rpc_errors":%d,"tool_errors":%d,'
         .. '"connect_errors":%d,"read_errors":%d,"write_errors":%d,"timeouts":%d,"wrk_status_errors":%d,'
         .. '"lat_mean_us":%.2f,"lat_stdev_us":%.2f,"lat_max_us":%d,'
         .. '"p50_us":%d,"p90_us":%d,"p95_us":%d,"p99_us":%d,"p999_us":%d}',
      summary.requests, summary.duration, summary.bytes, resp,
      n2, s503, rpc, tool,
      e.connect, e.read, e.write, e.timeout, e.status,
      latency.mean, latency.stdev, latency.max,
      latency:percentile(50), latency:percentile(90), latency:percentile(95),
      latency:percentile(99), latency:percentile(99.9))
   io.write("BENCH_JSON " .. out .. "\n")
end
