-- Argo CD health check for every Nubes kind (resource.customizations.health.<group>_<Kind>,
-- see argocd-cm.yaml next to this file). It reads the same kstatus conditions
-- GitOps tools built on sigs.k8s.io/cli-utils read, with the same outcome:
--   being deleted                                  -> Progressing ("Deleting")
--   no status, or status.observedGeneration behind  -> Progressing
--   Stalled=True (bad input, exhausted pool, ...)  -> Degraded, "Reason: message"
--   Reconciling=True                               -> Progressing, "Reason: message"
--   Ready=True                                     -> Healthy
--   Ready=False without either                     -> Progressing
local hs = {status = "Progressing", message = "Waiting for the Nubes controller"}
local meta = obj.metadata or {}
if meta.deletionTimestamp ~= nil then
  hs.message = "Deleting"
  return hs
end
local status = obj.status
if status == nil then
  return hs
end
local generation = meta.generation
local observed = status.observedGeneration
if generation ~= nil and (observed == nil or observed < generation) then
  hs.message = "Waiting for the controller to observe generation " .. tostring(generation)
  return hs
end
local found = {}
for _, c in ipairs(status.conditions or {}) do
  found[c.type] = c
end
local function describe(c)
  local reason = c.reason or ""
  local message = c.message or ""
  if reason ~= "" and message ~= "" then
    return reason .. ": " .. message
  end
  return reason .. message
end
if found.Stalled ~= nil and found.Stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = describe(found.Stalled)
  return hs
end
if found.Reconciling ~= nil and found.Reconciling.status == "True" then
  hs.message = describe(found.Reconciling)
  return hs
end
if found.Ready ~= nil and found.Ready.status == "True" then
  hs.status = "Healthy"
  hs.message = describe(found.Ready)
  return hs
end
if found.Ready ~= nil then
  hs.message = describe(found.Ready)
end
return hs
