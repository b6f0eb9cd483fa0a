//! A collaboration's small certificate authority: `railyard certs init` and `certs issue`.
//!
//! One CA per collaboration, kept by whoever coordinates it (usually next to the hub). Every
//! party gets a certificate whose subject alternative names carry its Railyard name (the
//! hub's, or a station's name as the hub's configuration spells it) plus the host names and
//! addresses it is reached at. The name is what the peers check; the CA is what they trust.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use crate::error::{Error, Result};
use crate::tls::valid_name;

/// File names inside a certificate directory.
pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca.key";

/// How long certificates are valid.
const CA_YEARS: i64 = 10;
const LEAF_DAYS: i64 = 825;

fn write_new(path: &Path, contents: &str, secret: bool) -> Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let write = |source| Error::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut file = options.open(path).map_err(write)?;
    file.write_all(contents.as_bytes()).map_err(write)?;
    file.sync_all().map_err(write)
}

fn cert_error(e: rcgen::Error) -> Error {
    Error::Certificate(e.to_string())
}

/// Creates `dir/ca.pem` and `dir/ca.key` for `collaboration`; refuses to overwrite.
pub fn init(dir: &Path, collaboration: &str) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    let key = KeyPair::generate().map_err(cert_error)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Railyard");
    dn.push(
        DnType::CommonName,
        format!("Railyard CA for {collaboration}"),
    );
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = time_now();
    params.not_before = now;
    params.not_after = now + rcgen_days(365 * CA_YEARS);
    let cert = params.self_signed(&key).map_err(cert_error)?;
    let cert_path = dir.join(CA_CERT);
    let key_path = dir.join(CA_KEY);
    for path in [&cert_path, &key_path] {
        if path.exists() {
            return Err(Error::Invalid(format!(
                "{} exists already; a CA is created once per collaboration",
                path.display()
            )));
        }
    }
    write_new(&key_path, &key.serialize_pem(), true)?;
    write_new(&cert_path, &cert.pem(), false)?;
    Ok(cert_path)
}

/// What `issue` wrote.
#[derive(Debug)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Issues `dir/NAME.pem` and `dir/NAME.key` under the CA in `dir`: a certificate naming
/// `name` (checked by peers) and `hosts` (DNS names or IP addresses it is reached at).
pub fn issue(dir: &Path, name: &str, hosts: &[String]) -> Result<Issued> {
    if !valid_name(name) {
        return Err(Error::Invalid(format!(
            "'{name}' cannot name a hub or station in a certificate: use letters, digits, \
             '-' and '.' (at most 63 characters)"
        )));
    }
    let read = |path: PathBuf| {
        std::fs::read_to_string(&path).map_err(|source| Error::Read { path, source })
    };
    let ca_cert = read(dir.join(CA_CERT))?;
    let ca_key = KeyPair::from_pem(&read(dir.join(CA_KEY))?).map_err(cert_error)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_cert, ca_key).map_err(cert_error)?;

    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Railyard");
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    let mut sans = vec![SanType::DnsName(name.try_into().map_err(cert_error)?)];
    for host in hosts {
        if host.contains('*') {
            return Err(Error::Invalid(format!(
                "'{host}': wildcard host names are not issued (a certificate names one party)"
            )));
        }
        let san = match host.parse::<std::net::IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(host.as_str().try_into().map_err(|e| {
                Error::Invalid(format!(
                    "'{host}' is neither an IP address nor a DNS name: {e}"
                ))
            })?),
        };
        if !sans.contains(&san) {
            sans.push(san);
        }
    }
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    // Every party is a server to some and a client to others (an outbound station dials
    // the hub; the hub dials inbound stations).
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let now = time_now();
    params.not_before = now;
    params.not_after = now + rcgen_days(LEAF_DAYS);
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate().map_err(cert_error)?;
    let cert = params.signed_by(&key, &issuer).map_err(cert_error)?;
    let issued = Issued {
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}.key")),
    };
    for path in [&issued.cert, &issued.key] {
        if path.exists() {
            return Err(Error::Invalid(format!(
                "{} exists already; remove it first to issue a new certificate for '{name}'",
                path.display()
            )));
        }
    }
    write_new(&issued.key, &key.serialize_pem(), true)?;
    write_new(&issued.cert, &cert.pem(), false)?;
    Ok(issued)
}

/// Now, less an hour: the peers' clocks may be a little behind the issuer's.
fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc() - time::Duration::hours(1)
}

fn rcgen_days(days: i64) -> time::Duration {
    time::Duration::days(days)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::{names, read_certificates, valid_name};

    #[test]
    fn a_certificate_names_its_party_and_no_other() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), "lung").unwrap();
        // A host alias (even one spelled like the hub) does not make a party the hub.
        let station = issue(dir.path(), "amsterdam", &["hub".into(), "127.0.0.1".into()]).unwrap();
        let cert = &read_certificates(&station.cert).unwrap()[0];
        assert!(names(cert, "amsterdam"));
        assert!(!names(cert, "hub"));
        assert!(!names(cert, "leiden"));

        // Nothing is overwritten, wildcards and IP-like names are not issued.
        assert!(init(dir.path(), "lung").is_err());
        assert!(issue(dir.path(), "amsterdam", &[]).is_err());
        assert!(issue(dir.path(), "leiden", &["*.example.org".into()]).is_err());
        assert!(issue(dir.path(), "10.0.0.5", &[]).is_err());
        assert!(!valid_name("a_b") && !valid_name("-a") && valid_name("utrecht-umc"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&station.key)
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "the key is readable by others");
        }
    }
}
