-- Probe how many values Lua's unpack may push on this server: double a size
-- starting at 999 until unpack fails, and return the largest that worked.
local size = 999
while true do
  local ok = pcall(function() return unpack({}, 1, size * 2) end)
  if not ok then
    return size
  end
  size = size * 2
end
