-- wrk script: GET $NOPS_PATH over keep-alive connections, with `Authorization: Bearer
-- $NOPS_CREDENTIAL` when that is set. Drives every row of the auth benchmark, including the
-- unauthenticated baseline, so the rows differ only in what the kernel does.
wrk.method = "GET"
local credential = os.getenv("NOPS_CREDENTIAL")
if credential ~= nil and credential ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. credential
end
local path = os.getenv("NOPS_PATH")

request = function()
  return wrk.format(nil, path)
end

-- Run from the repository root (as run.sh and auth.sh do).
dofile("benches/wrk_result.lua")
