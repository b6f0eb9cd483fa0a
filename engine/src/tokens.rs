//! Researchers' bearer tokens: issued by `railyard token create`, checked on every Flight SQL
//! call, kept in the hub's embedded database (SQLite, `<data dir>/tokens.sqlite`).
//!
//! A token is `ryt_<id>_<secret>`: the id finds the row (and names the token in `token list`
//! and `token revoke`), the 256-bit random secret proves possession. Only SHA-256 of the
//! secret is stored — a high-entropy secret needs no slow hash — so a copy of the database
//! grants nothing. Each token belongs to one researcher in one collaboration and expires;
//! revoking is immediate (every call reads the row).

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::RngCore;
use rusqlite::{Connection, OptionalExtension, params};
use sha2::{Digest, Sha256};

/// Errors of the token store.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("token database {path}: {source}")]
    Database {
        path: String,
        source: rusqlite::Error,
    },
    #[error("no token with id '{0}'")]
    Unknown(String),
}

/// Why a presented token was not accepted. The texts name the reason, never the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("no bearer token: send 'authorization: Bearer <token>' (railyard token create)")]
    Missing,
    #[error("the bearer token is not a Railyard token")]
    Malformed,
    #[error("the bearer token is not known to this hub")]
    Unknown,
    #[error("the bearer token was revoked")]
    Revoked,
    #[error("the bearer token expired")]
    Expired,
}

/// Who a valid token speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bearer {
    pub id: String,
    pub researcher: String,
    pub collaboration: String,
}

/// A token as `token list` shows it (never its secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenInfo {
    pub id: String,
    pub researcher: String,
    pub collaboration: String,
    /// Seconds since the Unix epoch.
    pub created: i64,
    pub expires: i64,
    pub revoked: Option<i64>,
}

/// A newly created token: the only time its text exists outside the researcher's hands.
#[derive(Debug, Clone)]
pub struct NewToken {
    pub id: String,
    pub token: String,
    pub expires: i64,
}

const PREFIX: &str = "ryt_";

/// The hub's token database.
pub struct TokenStore {
    path: String,
    conn: Mutex<Connection>,
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn digest(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

/// Compares two digests in time independent of where they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl TokenStore {
    /// Opens (creating if needed) the token database at `path`.
    pub fn open(path: &Path) -> Result<Self, TokenError> {
        let name = path.display().to_string();
        let db = |source| TokenError::Database {
            path: name.clone(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| TokenError::Database {
                path: name.clone(),
                source: rusqlite::Error::ToSqlConversionFailure(Box::new(e)),
            })?;
        }
        let conn = Connection::open(path).map_err(db)?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(db)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(db)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(db)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS tokens (
                 id TEXT PRIMARY KEY,
                 secret_sha256 BLOB NOT NULL,
                 researcher TEXT NOT NULL,
                 collaboration TEXT NOT NULL,
                 created INTEGER NOT NULL,
                 expires INTEGER NOT NULL,
                 revoked INTEGER
             )",
        )
        .map_err(db)?;
        Ok(Self {
            path: name,
            conn: Mutex::new(conn),
        })
    }

    fn db(&self, source: rusqlite::Error) -> TokenError {
        TokenError::Database {
            path: self.path.clone(),
            source,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite itself consistent (each statement is
        // its own transaction).
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Issues a token for `researcher` in `collaboration`, valid for `valid_for`.
    pub fn create(
        &self,
        researcher: &str,
        collaboration: &str,
        valid_for: Duration,
    ) -> Result<NewToken, TokenError> {
        let mut rng = rand::rng();
        let mut id = [0u8; 6];
        let mut secret = [0u8; 32];
        rng.fill_bytes(&mut id);
        rng.fill_bytes(&mut secret);
        let (id, secret) = (hex::encode(id), hex::encode(secret));
        let created = now();
        let expires =
            created.saturating_add(i64::try_from(valid_for.as_secs()).unwrap_or(i64::MAX));
        self.lock()
            .execute(
                "INSERT INTO tokens (id, secret_sha256, researcher, collaboration, created, expires)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![id, digest(&secret), researcher, collaboration, created, expires],
            )
            .map_err(|e| self.db(e))?;
        Ok(NewToken {
            token: format!("{PREFIX}{id}_{secret}"),
            id,
            expires,
        })
    }

    /// Revokes the token `id` (at once: the next call with it is refused).
    pub fn revoke(&self, id: &str) -> Result<(), TokenError> {
        let conn = self.lock();
        // Revoking twice keeps the first revocation time; an unknown id is an error.
        conn.execute(
            "UPDATE tokens SET revoked = ?2 WHERE id = ?1 AND revoked IS NULL",
            params![id, now()],
        )
        .map_err(|e| self.db(e))?;
        let known: bool = conn
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM tokens WHERE id = ?1)",
                params![id],
                |r| r.get(0),
            )
            .map_err(|e| self.db(e))?;
        if !known {
            return Err(TokenError::Unknown(id.to_string()));
        }
        Ok(())
    }

    /// Every token ever issued, oldest first.
    pub fn list(&self) -> Result<Vec<TokenInfo>, TokenError> {
        let conn = self.lock();
        let mut statement = conn
            .prepare(
                "SELECT id, researcher, collaboration, created, expires, revoked
                 FROM tokens ORDER BY created, id",
            )
            .map_err(|e| self.db(e))?;
        let rows = statement
            .query_map([], |r| {
                Ok(TokenInfo {
                    id: r.get(0)?,
                    researcher: r.get(1)?,
                    collaboration: r.get(2)?,
                    created: r.get(3)?,
                    expires: r.get(4)?,
                    revoked: r.get(5)?,
                })
            })
            .map_err(|e| self.db(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.db(e))
    }

    /// Who `token` speaks for, or why it is refused.
    pub fn verify(&self, token: &str) -> Result<Result<Bearer, Refused>, TokenError> {
        let Some((id, secret)) = token
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split_once('_'))
        else {
            return Ok(Err(Refused::Malformed));
        };
        let row = self
            .lock()
            .query_row(
                "SELECT secret_sha256, researcher, collaboration, expires, revoked
                 FROM tokens WHERE id = ?1",
                params![id],
                |r| {
                    Ok((
                        r.get::<_, Vec<u8>>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, i64>(3)?,
                        r.get::<_, Option<i64>>(4)?,
                    ))
                },
            )
            .optional()
            .map_err(|e| self.db(e))?;
        let Some((stored, researcher, collaboration, expires, revoked)) = row else {
            return Ok(Err(Refused::Unknown));
        };
        if !same(&stored, &digest(secret)) {
            return Ok(Err(Refused::Unknown));
        }
        if revoked.is_some() {
            return Ok(Err(Refused::Revoked));
        }
        if now() >= expires {
            return Ok(Err(Refused::Expired));
        }
        Ok(Ok(Bearer {
            id: id.to_string(),
            researcher,
            collaboration,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_speaks_for_its_researcher_until_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let store = TokenStore::open(&dir.path().join("tokens.sqlite")).unwrap();
        let alice = store
            .create("alice", "lung", Duration::from_secs(3600))
            .unwrap();
        let bearer = store.verify(&alice.token).unwrap().unwrap();
        assert_eq!(bearer.researcher, "alice");
        assert_eq!(bearer.collaboration, "lung");
        assert_eq!(bearer.id, alice.id);

        // Another secret under the same id, a made-up id, and garbage are all refused.
        let forged = format!("{PREFIX}{}_{}", alice.id, "0".repeat(64));
        assert_eq!(store.verify(&forged).unwrap(), Err(Refused::Unknown));
        assert_eq!(
            store.verify(&format!("{PREFIX}abc_def")).unwrap(),
            Err(Refused::Unknown)
        );
        assert_eq!(store.verify("Bearer x").unwrap(), Err(Refused::Malformed));

        store.revoke(&alice.id).unwrap();
        assert_eq!(store.verify(&alice.token).unwrap(), Err(Refused::Revoked));
        assert!(matches!(store.revoke("nope"), Err(TokenError::Unknown(_))));
        let listed = store.list().unwrap();
        assert_eq!(listed.len(), 1);
        assert!(listed[0].revoked.is_some());
    }

    #[test]
    fn an_expired_token_is_refused_and_the_secret_is_not_stored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.sqlite");
        let store = TokenStore::open(&path).unwrap();
        let gone = store.create("bob", "lung", Duration::ZERO).unwrap();
        assert_eq!(store.verify(&gone.token).unwrap(), Err(Refused::Expired));
        drop(store);
        let secret = gone.token.rsplit('_').next().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let wal = std::fs::read(path.with_extension("sqlite-wal")).unwrap_or_default();
        for file in [&bytes, &wal] {
            assert!(
                !file.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "the token's secret is in the database"
            );
        }
        // A reopened store still knows the token.
        let store = TokenStore::open(&path).unwrap();
        assert_eq!(store.verify(&gone.token).unwrap(), Err(Refused::Expired));
    }
}
