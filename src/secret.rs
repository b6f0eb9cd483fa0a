//! A collaboration secret: the key of the pseudonyms that link a vertical table's parts.
//!
//! Only the collaboration's stations hold it; the hub never reads it, so the hub sees a
//! patient's pseudonym but can neither reverse it nor compute one from a key it knows. One
//! station operator creates the file with `railyard secret init`, and the operators pass it
//! to each other out of band (never through the hub). A station loads it from
//! `collaboration_secret_file` and refuses to start if anyone but its owner may read it.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail, ensure};
use railyard_udfs::pseudonym::MIN_SECRET_BYTES;

/// The first line of every secret file.
const HEADER: &str = "# railyard collaboration secret";

/// Writes a fresh random secret for `collaboration` to `out`, readable by its owner only
/// (0600). An existing file is never replaced: a changed secret would silently unlink
/// every vertical table of the collaboration.
pub fn init(collaboration: &str, out: &Path) -> Result<()> {
    ensure!(
        !collaboration.is_empty()
            && collaboration
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
        "collaboration name '{collaboration}': use letters, digits, '-' and '_'"
    );
    let hex = hex::encode(random());
    let text = format!(
        "{HEADER} for '{collaboration}'\n# give it to this collaboration's stations only, \
         never to its hub\n{hex}\n"
    );
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(out).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            anyhow::anyhow!(
                "{} exists; a secret is never replaced (every station of the collaboration \
                 holds it): remove the file yourself if you really mean to start over",
                out.display()
            )
        } else {
            anyhow::Error::new(e).context(format!("cannot create {}", out.display()))
        }
    })?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", out.display()))?;
    Ok(())
}

/// A fresh random secret of [`MIN_SECRET_BYTES`] bytes (`secret init`; `railyard local` draws
/// one per run).
pub fn random() -> Arc<[u8]> {
    use rand::RngCore;
    let mut secret = vec![0u8; MIN_SECRET_BYTES];
    rand::rng().fill_bytes(&mut secret);
    Arc::from(secret)
}

/// Opens `path`, refusing a file that others than its owner may read or write (`why` says
/// what it holds, in the refusal).
pub fn open_private(path: &Path, why: &str) -> Result<std::fs::File> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = file
            .metadata()
            .with_context(|| format!("cannot read {}", path.display()))?
            .permissions()
            .mode();
        ensure!(
            mode & 0o077 == 0,
            "{} may be read or written by others than its owner (mode {:04o}); {why}: \
             `chmod 600 {}`",
            path.display(),
            mode & 0o7777,
            path.display()
        );
    }
    Ok(file)
}

/// Reads a secret file written by [`init`] (or any file of comment lines and one line of
/// at least 64 hex digits), refusing one that others than its owner may read or write.
pub fn load(path: &Path) -> Result<Arc<[u8]>> {
    let file = open_private(path, "the collaboration secret must stay with this station")?;
    let text =
        std::io::read_to_string(file).with_context(|| format!("cannot read {}", path.display()))?;
    let mut lines = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'));
    let (Some(line), None) = (lines.next(), lines.next()) else {
        bail!(
            "{} is not a collaboration secret: expected one line of hex digits (from \
             `railyard secret init`)",
            path.display()
        );
    };
    // The decoder's error names the offending character: say only where it is.
    let bytes = hex::decode(line).map_err(|_| {
        anyhow::anyhow!(
            "{} is not a collaboration secret: its line is not hex digits",
            path.display()
        )
    })?;
    ensure!(
        bytes.len() >= MIN_SECRET_BYTES,
        "{}: a collaboration secret needs at least {MIN_SECRET_BYTES} bytes ({} hex digits); \
         this one has {}",
        path.display(),
        2 * MIN_SECRET_BYTES,
        bytes.len()
    );
    Ok(Arc::from(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_is_created_private_loaded_and_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("linkage.secret");
        init("linkage", &path).unwrap();
        let secret = load(&path).unwrap();
        assert_eq!(secret.len(), MIN_SECRET_BYTES);
        // Two secrets are never the same.
        let other = dir.path().join("other.secret");
        init("linkage", &other).unwrap();
        assert_ne!(load(&other).unwrap(), secret);
        // Never overwritten: the first secret is still there.
        let e = init("linkage", &path).unwrap_err();
        assert!(e.to_string().contains("never replaced"), "{e}");
        assert_eq!(load(&path).unwrap(), secret);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
            let e = load(&path).unwrap_err().to_string();
            assert!(e.contains("chmod 600") && e.contains("0640"), "{e}");
            // The refusal never shows the secret itself.
            let text = std::fs::read_to_string(&path).unwrap();
            let hex = text.lines().last().unwrap();
            assert!(!e.contains(hex), "{e}");
        }
    }

    #[test]
    fn a_file_that_is_not_a_secret_is_refused_without_echoing_it() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            }
            path
        };
        let short = write("short", "# a comment\nabcdef0123\n");
        let e = load(&short).unwrap_err().to_string();
        assert!(
            e.contains("at least 32 bytes") && !e.contains("abcdef0123"),
            "{e}"
        );
        let not_hex = write("not-hex", &"zz".repeat(40));
        let e = format!("{:#}", load(&not_hex).unwrap_err());
        assert!(e.contains("not hex digits") && !e.contains("zzzz"), "{e}");
        let two = write(
            "two",
            &format!("{}\n{}\n", "ab".repeat(32), "cd".repeat(32)),
        );
        assert!(load(&two).unwrap_err().to_string().contains("one line"));
        let empty = write("empty", "# nothing\n");
        assert!(load(&empty).is_err());
        let e = init("a b", &dir.path().join("x")).unwrap_err().to_string();
        assert!(e.contains("letters, digits"), "{e}");
    }
}
