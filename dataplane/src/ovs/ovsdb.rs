//! A small OVSDB client (JSON-RPC 1.0 over a unix socket, RFC 7047): enough
//! of `transact` to create bridges, ports and interfaces in the
//! `Open_vSwitch` database and to read back what ovs-vswitchd made of them.

use std::io::{BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

/// Errors talking to ovsdb-server.
#[derive(Debug, thiserror::Error)]
pub enum OvsdbError {
    /// The socket could not be reached.
    #[error("Cannot connect to OVSDB at {path}: {source}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Reading or writing the socket failed, or the server closed it.
    #[error("OVSDB connection failed: {0}")]
    Io(#[from] std::io::Error),
    /// The server sent something that is not JSON-RPC.
    #[error("OVSDB sent malformed JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// The server answered with an error (whole request or one operation).
    #[error("OVSDB refused the transaction: {0}")]
    Refused(String),
}

/// A synchronous OVSDB connection.
pub struct Ovsdb {
    writer: UnixStream,
    reader: serde_json::StreamDeserializer<'static, serde_json::de::IoRead<BufReader<UnixStream>>, Value>,
    next_id: u64,
    db: String,
}

impl Ovsdb {
    /// Connects to the unix socket at `path` and uses database `Open_vSwitch`.
    pub fn connect(path: &Path) -> Result<Ovsdb, OvsdbError> {
        let stream = UnixStream::connect(path).map_err(|source| OvsdbError::Connect { path: path.to_path_buf(), source })?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let reader = serde_json::Deserializer::from_reader(BufReader::new(stream.try_clone()?)).into_iter::<Value>();
        Ok(Ovsdb { writer: stream, reader, next_id: 1, db: "Open_vSwitch".into() })
    }

    /// Sends one request and waits for its answer, replying to the server's echo probes meanwhile.
    pub fn call(&mut self, method: &str, params: Value) -> Result<Value, OvsdbError> {
        let id = self.next_id;
        self.next_id += 1;
        let req = json!({"method": method, "params": params, "id": id});
        self.writer.write_all(serde_json::to_vec(&req)?.as_slice())?;
        loop {
            let msg = match self.reader.next() {
                Some(m) => m?,
                None => return Err(OvsdbError::Io(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "server closed the connection"))),
            };
            if msg.get("method").and_then(Value::as_str) == Some("echo") {
                let reply = json!({"result": msg["params"], "error": null, "id": msg["id"]});
                self.writer.write_all(serde_json::to_vec(&reply)?.as_slice())?;
                continue;
            }
            if msg.get("id").and_then(Value::as_u64) != Some(id) {
                // An update notification or a stale answer: not ours.
                continue;
            }
            if let Some(e) = msg.get("error").filter(|e| !e.is_null()) {
                return Err(OvsdbError::Refused(e.to_string()));
            }
            return Ok(msg.get("result").cloned().unwrap_or(Value::Null));
        }
    }

    /// Runs `ops` as one transaction; returns the per-operation results, or
    /// the first operation error (the server then committed nothing).
    pub fn transact(&mut self, ops: Vec<Value>) -> Result<Vec<Value>, OvsdbError> {
        let mut params = vec![Value::String(self.db.clone())];
        params.extend(ops);
        let result = self.call("transact", Value::Array(params))?;
        let results = result.as_array().cloned().unwrap_or_default();
        if let Some(e) = results.iter().find_map(|r| r.get("error").filter(|e| !e.is_null()).map(|e| format!("{e}: {}", r.get("details").and_then(Value::as_str).unwrap_or("")))) {
            return Err(OvsdbError::Refused(e));
        }
        Ok(results)
    }

    /// Rows of `table` where `column` equals `value`, with `columns` only.
    pub fn select(&mut self, table: &str, column: &str, value: Value, columns: &[&str]) -> Result<Vec<Value>, OvsdbError> {
        let r = self.transact(vec![json!({"op": "select", "table": table, "where": [[column, "==", value]], "columns": columns})])?;
        Ok(r.first().and_then(|r| r.get("rows")).and_then(Value::as_array).cloned().unwrap_or_default())
    }
}

/// An OVSDB map (`["map", [[k, v], ...]]`) from string pairs.
pub fn map<'a>(pairs: impl IntoIterator<Item = (&'a str, String)>) -> Value {
    Value::Array(vec![Value::String("map".into()), Value::Array(pairs.into_iter().map(|(k, v)| json!([k, v])).collect())])
}

/// A reference to a row created earlier in the same transaction.
pub fn named(name: &str) -> Value {
    json!(["named-uuid", name])
}

/// The uuid of a row as returned by select (`["uuid", "..."]`).
pub fn row_uuid(row: &Value) -> Option<Value> {
    row.get("_uuid").cloned()
}

/// An integer column that OVSDB may return as an empty set when unset.
pub fn int_column(row: &Value, col: &str) -> Option<i64> {
    row.get(col).and_then(Value::as_i64)
}
