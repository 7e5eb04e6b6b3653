-- wrk script: heartbeats over keep-alive connections, cycling through the agent ids in
-- $NOPS_IDS with the key in $NOPS_KEY. The same script drives the bare baseline.
local ids = {}
for line in io.lines(os.getenv("NOPS_IDS")) do
  ids[#ids + 1] = line
end
local i = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("NOPS_KEY")
wrk.body = '{"in_flight_tasks":2,"cpu_ratio":0.4,"memory_bytes":1000000,"latency_ms":12.5,"error_count":0,"request_count":100}'

request = function()
  i = i + 1
  return wrk.format(nil, "/api/v1/agents/" .. ids[(i % #ids) + 1] .. "/heartbeat")
end

-- Run from the repository root (as run.sh and auth.sh do).
dofile("benches/wrk_result.lua")
