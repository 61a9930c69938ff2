//! A client of the site admin API (src/admin.rs), for `stretch status` and `stretch verify`.

use std::time::Duration;

use anyhow::{bail, Context};
use serde::Deserialize;
use serde_json::Value;

use crate::admin::API_VERSION;

/// One call's time limit: a site answers status at once and reads at most 16 MiB per
/// blocks call.
const CALL_TIMEOUT: Duration = Duration::from_secs(20);

/// One site's admin API.
#[derive(Clone, Debug)]
pub(crate) struct AdminClient {
    /// `HOST:PORT`.
    pub(crate) addr: String,
}

/// One block as `GET /v1/blocks` reports it.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub(crate) struct BlockEntry {
    pub(crate) lba: u64,
    /// "ok" or "unreadable" (failed its checksum).
    pub(crate) state: String,
    pub(crate) crc32: Option<u32>,
    /// 32 hex digits.
    pub(crate) stamp: String,
    pub(crate) dirty: bool,
}

#[derive(Debug, Deserialize)]
struct BlocksReply {
    lba: u64,
    blocks: Vec<BlockEntry>,
}

impl AdminClient {
    /// Accepts `http://HOST:PORT[/]` or `HOST:PORT`.
    pub(crate) fn parse(url: &str) -> anyhow::Result<AdminClient> {
        let rest = url.strip_prefix("http://").unwrap_or(url);
        if rest.contains("://") {
            bail!("admin URL {url:?}: only http:// is supported");
        }
        let addr = rest.trim_end_matches('/');
        if addr.is_empty() || addr.contains('/') || !addr.contains(':') {
            bail!("admin URL {url:?}: expected http://HOST:PORT (as `stretch site` prints it)");
        }
        Ok(AdminClient { addr: addr.into() })
    }

    /// `POST path` with a JSON body; the reply's body on 200, else its error message.
    pub(crate) async fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        let (status, reply) = stretch_bench::http::call_with_timeout(
            &self.addr,
            "POST",
            path,
            Some(body),
            CALL_TIMEOUT,
        )
        .await?;
        if status != 200 {
            let message = reply["error"].as_str().unwrap_or("no error message");
            bail!("POST {path} at {}: HTTP {status}: {message}", self.addr);
        }
        Ok(reply)
    }

    async fn get(&self, path: &str) -> anyhow::Result<Value> {
        let (status, body) =
            stretch_bench::http::call_with_timeout(&self.addr, "GET", path, None, CALL_TIMEOUT)
                .await?;
        if status != 200 {
            let message = body["error"].as_str().unwrap_or("no error message");
            bail!("GET {path} at {}: HTTP {status}: {message}", self.addr);
        }
        Ok(body)
    }

    /// `GET /v1/status`, checked to be of an API version this binary understands.
    pub(crate) async fn status(&self) -> anyhow::Result<Value> {
        let status = self.get("/v1/status").await?;
        match status["api_version"].as_u64() {
            Some(v) if v == u64::from(API_VERSION) => Ok(status),
            other => bail!(
                "the site at {} speaks admin API version {other:?}, this binary {API_VERSION}",
                self.addr
            ),
        }
    }

    /// `POST /v1/repair`: repairs `lbas` at this site from its in-sync peer (`force`: take an
    /// equal stamp too). At most `REPAIR_BLOCKS_PER_CALL_MAX` blocks.
    pub(crate) async fn repair(&self, lbas: &[u64], force: bool) -> anyhow::Result<()> {
        let body = serde_json::json!({ "lbas": lbas, "force": force });
        self.post("/v1/repair", &body).await.map(drop)
    }

    /// `GET /v1/blocks`: exactly `count` blocks from `lba`, in order.
    pub(crate) async fn blocks(&self, lba: u64, count: u64) -> anyhow::Result<Vec<BlockEntry>> {
        let body = self
            .get(&format!("/v1/blocks?lba={lba}&count={count}"))
            .await?;
        let reply: BlocksReply = serde_json::from_value(body)
            .with_context(|| format!("blocks reply from {}", self.addr))?;
        let in_order = reply
            .blocks
            .iter()
            .enumerate()
            .all(|(i, b)| b.lba == lba + i as u64);
        if reply.lba != lba || reply.blocks.len() as u64 != count || !in_order {
            bail!(
                "the site at {} answered blocks {}+{} for {lba}+{count}",
                self.addr,
                reply.lba,
                reply.blocks.len()
            );
        }
        Ok(reply.blocks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_urls() {
        assert_eq!(
            AdminClient::parse("http://127.0.0.1:9/").unwrap().addr,
            "127.0.0.1:9"
        );
        assert_eq!(
            AdminClient::parse("127.0.0.2:80").unwrap().addr,
            "127.0.0.2:80"
        );
        assert!(AdminClient::parse("https://h:1").is_err());
        assert!(AdminClient::parse("http://h:1/v1/status").is_err());
        assert!(AdminClient::parse("http://host").is_err());
    }
}
