//! The proxy registry and Toxiproxy's HTTP API over it, as a pure `route` function (method,
//! path, body -> status, JSON) so tests drive it without sockets; `http.rs` carries it.
//!
//! Shapes and codes follow Toxiproxy v2's api.go: proxies are
//! `{"name","listen","upstream","enabled","toxics":[...]}`, errors are
//! `{"error": msg, "status": code}`, creates answer 201 (proxy) or 200 (toxic), deletes and
//! /reset answer 204, missing things 404, duplicates 409, bad bodies 400.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::{json, Value};

use super::proxy::{Proxy, ProxyConfig};
use super::toxic::{Toxic, ToxicError};

/// Reported by `GET /version`. Clients only display it; the suffix says who answers.
pub const TOXIPROXY_API_VERSION: &str = "2.12.0-stretch";

/// An API error in Toxiproxy's shape.
#[derive(Debug, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
}

impl ApiError {
    fn new(status: u16, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }
    fn proxy_not_found() -> ApiError {
        ApiError::new(404, "proxy not found")
    }
    fn toxic_not_found() -> ApiError {
        ApiError::new(404, "toxic not found")
    }
    fn bad_body(detail: &str) -> ApiError {
        ApiError::new(400, format!("bad request body: {detail}"))
    }
    pub fn to_json(&self) -> Value {
        json!({"error": self.message, "status": self.status})
    }
}

impl From<ToxicError> for ApiError {
    fn from(e: ToxicError) -> ApiError {
        match e {
            ToxicError::BadBody(d) => ApiError::bad_body(&d),
            ToxicError::InvalidStream => ApiError::new(
                400,
                "stream was invalid, can be either upstream or downstream",
            ),
            ToxicError::InvalidType => ApiError::new(400, "invalid toxic type"),
        }
    }
}

/// All proxies of one emulator process, by name.
#[derive(Default)]
pub struct Registry {
    // BTreeMap: listings come out in a stable order.
    proxies: Mutex<BTreeMap<String, Arc<Proxy>>>,
    next_toxic_id: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Registry {
    pub fn new() -> Arc<Registry> {
        Arc::new(Registry::default())
    }

    pub fn get(&self, name: &str) -> Result<Arc<Proxy>, ApiError> {
        lock(&self.proxies)
            .get(name)
            .cloned()
            .ok_or_else(ApiError::proxy_not_found)
    }

    pub fn list(&self) -> Vec<Arc<Proxy>> {
        lock(&self.proxies).values().cloned().collect()
    }

    pub fn create(&self, config: ProxyConfig) -> Result<Arc<Proxy>, ApiError> {
        if config.name.is_empty() {
            return Err(ApiError::new(400, "missing required field: name"));
        }
        if config.upstream.is_empty() {
            return Err(ApiError::new(400, "missing required field: upstream"));
        }
        let mut proxies = lock(&self.proxies);
        if proxies.contains_key(&config.name) {
            return Err(ApiError::new(409, "proxy already exists"));
        }
        let name = config.name.clone();
        let proxy = Proxy::new(config).map_err(|e| ApiError::new(500, format!("listen: {e}")))?;
        proxies.insert(name, proxy.clone());
        Ok(proxy)
    }

    pub fn delete(&self, name: &str) -> Result<(), ApiError> {
        let proxy = lock(&self.proxies)
            .remove(name)
            .ok_or_else(ApiError::proxy_not_found)?;
        proxy.stop();
        Ok(())
    }

    /// Re-enables every proxy and removes every toxic (`POST /reset`).
    pub fn reset(&self) -> Result<(), ApiError> {
        for p in self.list() {
            let mut c = p.config();
            c.enabled = true;
            p.update(c)
                .map_err(|e| ApiError::new(500, format!("listen: {e}")))?;
            p.toxics.with_mut(Vec::clear);
            p.toxics_changed();
        }
        Ok(())
    }

    pub fn add_toxic(&self, proxy: &str, body: &Value) -> Result<Toxic, ApiError> {
        let p = self.get(proxy)?;
        let id = self.next_toxic_id.fetch_add(1, Ordering::Relaxed);
        let toxic = Toxic::from_create_json(body, id)?;
        p.toxics.with_mut(|all| {
            if all.iter().any(|t| t.name == toxic.name) {
                return Err(ApiError::new(409, "toxic already exists"));
            }
            all.push(toxic.clone());
            Ok(())
        })?;
        p.toxics_changed();
        Ok(toxic)
    }

    pub fn update_toxic(&self, proxy: &str, name: &str, body: &Value) -> Result<Toxic, ApiError> {
        let p = self.get(proxy)?;
        let updated = p.toxics.with_mut(|all| {
            let slot = all
                .iter_mut()
                .find(|t| t.name == name)
                .ok_or_else(ApiError::toxic_not_found)?;
            let updated = slot.update_from_json(body)?;
            *slot = updated.clone();
            Ok::<_, ApiError>(updated)
        })?;
        p.toxics_changed();
        Ok(updated)
    }

    pub fn remove_toxic(&self, proxy: &str, name: &str) -> Result<(), ApiError> {
        let p = self.get(proxy)?;
        p.toxics.with_mut(|all| {
            let before = all.len();
            all.retain(|t| t.name != name);
            if all.len() == before {
                Err(ApiError::toxic_not_found())
            } else {
                Ok(())
            }
        })?;
        p.toxics_changed();
        Ok(())
    }

    fn update_proxy(&self, name: &str, body: &Value) -> Result<Arc<Proxy>, ApiError> {
        let p = self.get(name)?;
        let obj = body
            .as_object()
            .ok_or_else(|| ApiError::bad_body("expected a JSON object"))?;
        let mut c = p.config();
        if let Some(v) = obj.get("listen") {
            c.listen = v
                .as_str()
                .ok_or_else(|| ApiError::bad_body("listen: expected a string"))?
                .into();
        }
        if let Some(v) = obj.get("upstream") {
            c.upstream = v
                .as_str()
                .ok_or_else(|| ApiError::bad_body("upstream: expected a string"))?
                .into();
        }
        if let Some(v) = obj.get("enabled") {
            c.enabled = v
                .as_bool()
                .ok_or_else(|| ApiError::bad_body("enabled: expected a boolean"))?;
        }
        p.update(c)
            .map_err(|e| ApiError::new(500, format!("listen: {e}")))?;
        Ok(p)
    }

    /// `POST /populate`: creates the listed proxies, replacing any whose listen or upstream
    /// differ, and keeps the others.
    fn populate(&self, body: &Value) -> Result<Vec<Arc<Proxy>>, ApiError> {
        let list = body
            .as_array()
            .ok_or_else(|| ApiError::bad_body("expected a JSON array"))?;
        let mut out = Vec::with_capacity(list.len());
        for item in list {
            let cfg = proxy_config_from_json(item)?;
            if let Ok(existing) = self.get(&cfg.name) {
                let old = existing.config();
                if old.upstream == cfg.upstream && old.listen == cfg.listen {
                    out.push(existing);
                    continue;
                }
                self.delete(&cfg.name)?;
            }
            out.push(self.create(cfg)?);
        }
        Ok(out)
    }
}

fn proxy_config_from_json(body: &Value) -> Result<ProxyConfig, ApiError> {
    let obj = body
        .as_object()
        .ok_or_else(|| ApiError::bad_body("expected a JSON object"))?;
    let text = |key: &str| -> Result<String, ApiError> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(String::new()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(ApiError::bad_body(&format!("{key}: expected a string"))),
        }
    };
    let mut listen = text("listen")?;
    if listen.is_empty() {
        listen = "127.0.0.1:0".into();
    }
    let enabled = match obj.get("enabled") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ApiError::bad_body("enabled: expected a boolean")),
    };
    Ok(ProxyConfig {
        name: text("name")?,
        listen,
        upstream: text("upstream")?,
        enabled,
    })
}

/// One API call: returns the status and the JSON body (None for 204).
pub fn route(registry: &Registry, method: &str, path: &str, body: &[u8]) -> (u16, Option<Value>) {
    match route_inner(registry, method, path, body) {
        Ok(ok) => ok,
        Err(e) => (e.status, Some(e.to_json())),
    }
}

fn parse_body(body: &[u8]) -> Result<Value, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        // Go's decoder fails on an empty body with EOF; so do we.
        return Err(ApiError::bad_body("EOF"));
    }
    serde_json::from_slice(body).map_err(|e| ApiError::bad_body(&e.to_string()))
}

fn route_inner(
    reg: &Registry,
    method: &str,
    path: &str,
    body: &[u8],
) -> Result<(u16, Option<Value>), ApiError> {
    let path = path.split('?').next().unwrap_or("");
    let parts: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let not_allowed = || ApiError::new(405, "method not allowed");
    match (parts.as_slice(), method) {
        (["version"], "GET") => Ok((200, Some(json!({ "version": TOXIPROXY_API_VERSION })))),
        (["reset"], "POST") => reg.reset().map(|_| (204, None)),
        (["proxies"], "GET") => {
            let map: serde_json::Map<String, Value> =
                reg.list().iter().map(|p| (p.name(), p.to_json())).collect();
            Ok((200, Some(Value::Object(map))))
        }
        (["proxies"], "POST") => {
            let cfg = proxy_config_from_json(&parse_body(body)?)?;
            Ok((201, Some(reg.create(cfg)?.to_json())))
        }
        (["populate"], "POST") => {
            let proxies = reg.populate(&parse_body(body)?)?;
            let list: Vec<Value> = proxies.iter().map(|p| p.to_json()).collect();
            Ok((201, Some(json!({ "proxies": list }))))
        }
        (["proxies", name], "GET") => Ok((200, Some(reg.get(name)?.to_json()))),
        (["proxies", name], "POST" | "PATCH") => Ok((
            200,
            Some(reg.update_proxy(name, &parse_body(body)?)?.to_json()),
        )),
        (["proxies", name], "DELETE") => reg.delete(name).map(|_| (204, None)),
        (["proxies", name, "toxics"], "GET") => {
            let list: Vec<Value> = reg
                .get(name)?
                .toxics
                .snapshot()
                .iter()
                .map(Toxic::to_json)
                .collect();
            Ok((200, Some(Value::Array(list))))
        }
        (["proxies", name, "toxics"], "POST") => Ok((
            200,
            Some(reg.add_toxic(name, &parse_body(body)?)?.to_json()),
        )),
        (["proxies", name, "toxics", toxic], "GET") => {
            let p = reg.get(name)?;
            let t = p
                .toxics
                .with(|all| all.iter().find(|t| t.name == *toxic).cloned());
            Ok((
                200,
                Some(t.ok_or_else(ApiError::toxic_not_found)?.to_json()),
            ))
        }
        (["proxies", name, "toxics", toxic], "POST" | "PATCH") => Ok((
            200,
            Some(reg.update_toxic(name, toxic, &parse_body(body)?)?.to_json()),
        )),
        (["proxies", name, "toxics", toxic], "DELETE") => {
            reg.remove_toxic(name, toxic).map(|_| (204, None))
        }
        (["version" | "reset" | "populate"], _) | (["proxies", ..], _) if parts.len() <= 4 => {
            Err(not_allowed())
        }
        _ => Err(ApiError::new(404, "404 page not found")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_and_toxic_lifecycle_codes() {
        let reg = Registry::default();
        let body = br#"{"name":"p","listen":"127.0.0.1:0","upstream":"127.0.0.1:9"}"#;
        let (code, proxy) = route(&reg, "POST", "/proxies", body);
        assert_eq!(code, 201);
        let proxy = proxy.expect("body");
        assert_eq!(proxy["enabled"], json!(true));
        assert_ne!(
            proxy["listen"],
            json!("127.0.0.1:0"),
            "listen reports the bound port"
        );
        assert_eq!(route(&reg, "POST", "/proxies", body).0, 409);
        let toxic = br#"{"type":"latency","stream":"upstream","attributes":{"latency":5}}"#;
        let (code, t) = route(&reg, "POST", "/proxies/p/toxics", toxic);
        assert_eq!(code, 200);
        assert_eq!(t.expect("body")["name"], json!("latency_upstream"));
        assert_eq!(route(&reg, "POST", "/proxies/p/toxics", toxic).0, 409);
        assert_eq!(
            route(&reg, "GET", "/proxies/p/toxics/latency_upstream", b"").0,
            200
        );
        let (code, listed) = route(&reg, "GET", "/proxies", b"");
        assert_eq!(code, 200);
        assert_eq!(
            listed.expect("body")["p"]["toxics"][0]["attributes"]["latency"],
            json!(5)
        );
        assert_eq!(
            route(&reg, "DELETE", "/proxies/p/toxics/latency_upstream", b"").0,
            204
        );
        assert_eq!(
            route(&reg, "DELETE", "/proxies/p/toxics/latency_upstream", b"").0,
            404
        );
        assert_eq!(
            route(&reg, "POST", "/proxies/p/toxics", br#"{"type":"x"}"#).0,
            400
        );
        assert_eq!(
            route(&reg, "POST", "/proxies/p", br#"{"enabled":false}"#).0,
            200
        );
        assert_eq!(reg.get("p").expect("exists").listen_addr(), None);
        assert_eq!(route(&reg, "POST", "/reset", b"").0, 204);
        assert!(reg.get("p").expect("exists").listen_addr().is_some());
        assert_eq!(route(&reg, "DELETE", "/proxies/p", b"").0, 204);
        assert_eq!(route(&reg, "GET", "/proxies/p", b"").0, 404);
        assert_eq!(route(&reg, "POST", "/proxies", b"{not json").0, 400);
        assert_eq!(route(&reg, "POST", "/proxies", br#"{"name":"q"}"#).0, 400);
    }
}
