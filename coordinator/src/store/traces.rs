//! The trace context of each run (its root span's W3C `traceparent`), so spans made after a
//! coordinator restart still join the run's trace. Kept beside the runs table rather than in it:
//! tracing is optional and its data never affects scheduling.

use std::collections::HashMap;

use rusqlite::params;

use super::{Store, StoreError};

impl Store {
    /// Records the root span context of `run_id`.
    pub async fn put_run_trace(&self, run_id: &str, traceparent: &str) -> Result<(), StoreError> {
        let (run_id, traceparent) = (run_id.to_string(), traceparent.to_string());
        self.call(move |c| {
            c.execute(
                "INSERT OR REPLACE INTO run_traces (run_id, traceparent) VALUES (?1, ?2)",
                params![run_id, traceparent],
            )?;
            Ok(())
        })
        .await
    }

    /// The stored trace contexts of the given runs (those without one are absent).
    pub async fn run_traces(
        &self,
        run_ids: Vec<String>,
    ) -> Result<HashMap<String, String>, StoreError> {
        self.call(move |c| {
            let mut st = c.prepare("SELECT traceparent FROM run_traces WHERE run_id = ?1")?;
            let mut out = HashMap::new();
            for id in run_ids {
                let mut rows = st.query(params![id])?;
                if let Some(row) = rows.next()? {
                    out.insert(id, row.get::<_, String>(0)?);
                }
            }
            Ok(out)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn run_traces_round_trip() {
        let store = Store::open_in_memory().unwrap();
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        store.put_run_trace("r1", tp).await.unwrap();
        let got = store
            .run_traces(vec!["r1".into(), "r2".into()])
            .await
            .unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got["r1"], tp);
    }
}
