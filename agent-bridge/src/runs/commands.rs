//! The commands of SPEC §7.5: the bridge's own (`get_status`,
//! `module_control`) and those registered by workers, which are passed on.

use serde_json::{Value, json};

use super::{Bridge, BridgeError};
use crate::Caller;

fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs()
}

impl Bridge {
    /// Runs a command (SPEC §7.5) for `caller`. Who may call which method is
    /// the gateway's check (`rpc.<method>`); here `get_status` shows node-wide
    /// state only to admins, and workers are told who called.
    pub async fn call(&self, method: &str, params: Value, caller: &Caller) -> Result<Value, BridgeError> {
        match method {
            "get_status" if !caller.is_admin() => {
                let modules = self.shared.modules.lock().unwrap().clone();
                let agents: Vec<Value> = self
                    .agents()
                    .into_iter()
                    .map(|(name, source, ..)| json!({ "name": name, "source": source }))
                    .collect();
                Ok(json!({
                    "bridge": "ok",
                    "bus_linked": self.bus_linked().await,
                    "agents": agents,
                    "modules": modules,
                    "timestamp": now_unix(),
                }))
            }
            "get_status" => {
                let runs = self.shared.slots.lock().unwrap().active.len();
                let modules = self.shared.modules.lock().unwrap().clone();
                let bus = self.bus_linked().await;
                let agents: Vec<Value> = self
                    .agents()
                    .into_iter()
                    .map(|(name, source, capacity, load)| json!({ "name": name, "source": source, "capacity": capacity, "load": load }))
                    .collect();
                Ok(json!({
                    "bridge": "ok",
                    "bus_linked": bus,
                    "agents": agents,
                    "workers": self.shared.workers.list().into_iter().map(|w| json!({
                        "id": w.id, "name": w.name, "agents": w.agents, "methods": w.methods,
                        "max_concurrent_runs": w.max_runs, "load": w.load,
                    })).collect::<Vec<_>>(),
                    "runs_active": runs,
                    "modules": modules,
                    "timestamp": now_unix(),
                }))
            }
            "module_control" => {
                let module = params["module"]
                    .as_str()
                    .filter(|m| !m.is_empty())
                    .ok_or_else(|| BridgeError::InvalidInput("`module` must be a non-empty string".into()))?
                    .to_owned();
                let enabled = params["enabled"]
                    .as_bool()
                    .ok_or_else(|| BridgeError::InvalidInput("`enabled` must be a boolean".into()))?;
                self.shared.modules.lock().unwrap().insert(module.clone(), enabled);
                let state = json!({ "module": module, "enabled": enabled });
                self.announce("system", "module_status_changed", state.clone()).await;
                Ok(state)
            }
            "execute_command" => {
                let command = params["command"].as_str().unwrap_or_default().to_owned();
                match self.shared.workers.call(&command, params["args"].clone(), caller).await {
                    Some(outcome) => outcome.map_err(|(code, message)| BridgeError::Worker(code, message)),
                    None => Err(BridgeError::UnknownMethod(format!("no worker registered the command {command:?}"))),
                }
            }
            other => match self.shared.workers.call(other, params, caller).await {
                Some(outcome) => outcome.map_err(|(code, message)| BridgeError::Worker(code, message)),
                None => Err(BridgeError::UnknownMethod(format!("unknown method {other:?}"))),
            },
        }
    }
}
