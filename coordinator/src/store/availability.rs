//! Operator decisions about agents' new work (`paused`, `draining`), kept apart from the agent
//! records so they survive coordinator restarts without touching enrollment data.

use std::collections::HashMap;

use rusqlite::params;

use super::{Store, StoreError};

impl Store {
    /// Records `availability` for `agent_id`; `"active"` removes the record.
    pub async fn set_availability(
        &self,
        agent_id: &str,
        availability: &str,
    ) -> Result<(), StoreError> {
        let (agent_id, availability) = (agent_id.to_string(), availability.to_string());
        self.call(move |c| {
            if availability == "active" {
                c.execute(
                    "DELETE FROM agent_availability WHERE agent_id = ?1",
                    params![agent_id],
                )?;
            } else {
                c.execute(
                    "INSERT OR REPLACE INTO agent_availability (agent_id, availability) VALUES (?1, ?2)",
                    params![agent_id, availability],
                )?;
            }
            Ok(())
        })
        .await
    }

    /// Every agent that is not active, with its availability.
    pub async fn availabilities(&self) -> Result<HashMap<String, String>, StoreError> {
        self.call(|c| {
            let mut st = c.prepare("SELECT agent_id, availability FROM agent_availability")?;
            let rows =
                st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
            let mut out = HashMap::new();
            for row in rows {
                let (id, a) = row?;
                out.insert(id, a);
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
    async fn availability_round_trips() {
        let store = Store::open_in_memory().unwrap();
        assert!(store.availabilities().await.unwrap().is_empty());
        store.set_availability("a1", "paused").await.unwrap();
        store.set_availability("a2", "draining").await.unwrap();
        store.set_availability("a2", "active").await.unwrap();
        let all = store.availabilities().await.unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all["a1"], "paused");
    }
}
