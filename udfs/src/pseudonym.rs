//! `pseudonym(key)`: the keyed pseudonym that links the rows of a vertically partitioned
//! table across stations without revealing the key.
//!
//! Every station of a collaboration holds the same secret and computes
//! `HMAC-SHA256(secret, key as text)`, so equal keys give equal pseudonyms everywhere, while
//! the hub, which never holds the secret, can neither invert a pseudonym nor compute the
//! pseudonym of an identifier it knows (a plain hash could be recomputed from a guessed
//! identifier; a keyed one cannot).
//!
//! The key is hashed as its text (`12` and `'12'` link), so stations may store it with
//! different types. A NULL key has no pseudonym (the row links with nothing).

use std::fmt;
use std::sync::Arc;

use arrow::array::{Array, AsArray, BinaryBuilder};
use arrow::compute::cast;
use arrow::datatypes::DataType;
use datafusion::common::{Result, exec_err, plan_err};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// The function's SQL name.
pub const PSEUDONYM: &str = "pseudonym";
/// Bytes of one pseudonym.
pub const PSEUDONYM_BYTES: usize = 32;
/// Fewest bytes a collaboration secret may have (the HMAC key length of SHA-256's output).
pub const MIN_SECRET_BYTES: usize = 32;

/// The `pseudonym` function, keyed with a collaboration secret, or unkeyed: an unkeyed one
/// plans (the hub plans fragments with it) but refuses to run.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Pseudonym {
    secret: Option<Arc<[u8]>>,
    signature: Signature,
}

impl fmt::Debug for Pseudonym {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the secret.
        f.debug_struct("Pseudonym")
            .field("keyed", &self.secret.is_some())
            .finish()
    }
}

impl Pseudonym {
    /// The function without a secret: for planning only.
    pub fn unkeyed() -> Self {
        Self {
            secret: None,
            signature: Signature::any(1, Volatility::Immutable),
        }
    }

    /// The function keyed with `secret` (at least [`MIN_SECRET_BYTES`] bytes).
    pub fn keyed(secret: Arc<[u8]>) -> std::result::Result<Self, String> {
        if secret.len() < MIN_SECRET_BYTES {
            return Err(format!(
                "a collaboration secret must have at least {MIN_SECRET_BYTES} bytes; this one has {}",
                secret.len()
            ));
        }
        Ok(Self {
            secret: Some(secret),
            signature: Signature::any(1, Volatility::Immutable),
        })
    }

    pub fn udf(self) -> ScalarUDF {
        ScalarUDF::from(self)
    }
}

/// HMAC-SHA256 of `text` under `secret`.
pub fn pseudonym_of(secret: &[u8], text: &[u8]) -> [u8; PSEUDONYM_BYTES] {
    PseudonymKey::new(secret).of(text)
}

/// An HMAC-SHA256 key made ready once: its padded inner and outer blocks hashed, so that
/// each text then costs two SHA-256 compressions instead of four. The same MAC as
/// [`pseudonym_of`], for a key used for many texts (a column's rows, a station's margins).
#[derive(Clone)]
pub struct PseudonymKey(Hmac<Sha256>);

impl PseudonymKey {
    pub fn new(secret: &[u8]) -> Self {
        // HMAC accepts keys of any length; `new_from_slice` cannot fail for it.
        Self(<Hmac<Sha256> as KeyInit>::new_from_slice(secret).expect("HMAC takes any key"))
    }

    /// HMAC-SHA256 of `text` under this key.
    pub fn of(&self, text: &[u8]) -> [u8; PSEUDONYM_BYTES] {
        let mut mac = self.0.clone();
        mac.update(text);
        mac.finalize().into_bytes().into()
    }
}

impl fmt::Debug for PseudonymKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the key.
        f.write_str("PseudonymKey(…)")
    }
}

impl ScalarUDFImpl for Pseudonym {
    fn name(&self) -> &str {
        PSEUDONYM
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        match arg_types {
            [t] if t.is_nested() => {
                plan_err!("{PSEUDONYM}: the key must be a number or a string, not {t}")
            }
            [_] => Ok(DataType::Binary),
            _ => plan_err!("{PSEUDONYM} takes exactly one argument, the join key column"),
        }
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let Some(secret) = &self.secret else {
            return exec_err!(
                "{PSEUDONYM}: this session holds no collaboration secret (only stations do)"
            );
        };
        let [key] = args.args.as_slice() else {
            return exec_err!("{PSEUDONYM} takes exactly one argument");
        };
        let keys = key.to_array(args.number_rows)?;
        let text = cast(&keys, &DataType::Utf8)?;
        let text = text.as_string::<i32>();
        let mut out = BinaryBuilder::with_capacity(text.len(), text.len() * PSEUDONYM_BYTES);
        let secret = PseudonymKey::new(secret);
        for value in text.iter() {
            match value {
                Some(v) => out.append_value(secret.of(v.as_bytes())),
                None => out.append_null(),
            }
        }
        Ok(ColumnarValue::Array(Arc::new(out.finish())))
    }
}

#[cfg(test)]
mod tests {
    use arrow::array::{ArrayRef, BinaryArray, Int64Array, StringArray};
    use arrow::datatypes::Field;
    use datafusion::config::ConfigOptions;

    use super::*;

    fn run(f: &Pseudonym, keys: ArrayRef) -> Result<BinaryArray> {
        let n = keys.len();
        let field = Arc::new(Field::new("k", keys.data_type().clone(), true));
        let out = f.invoke_with_args(ScalarFunctionArgs {
            args: vec![ColumnarValue::Array(keys)],
            arg_fields: vec![field],
            number_rows: n,
            return_field: Arc::new(Field::new("p", DataType::Binary, true)),
            config_options: Arc::new(ConfigOptions::default()),
        })?;
        let ColumnarValue::Array(a) = out else {
            panic!("an array in, an array out")
        };
        Ok(a.as_binary::<i32>().clone())
    }

    #[test]
    fn equal_keys_link_across_types_and_the_secret_matters() {
        let secret: Arc<[u8]> = Arc::from(vec![7u8; 32]);
        let f = Pseudonym::keyed(Arc::clone(&secret)).unwrap();
        let ints = run(
            &f,
            Arc::new(Int64Array::from(vec![Some(12), None, Some(13)])),
        )
        .unwrap();
        let strings = run(&f, Arc::new(StringArray::from(vec!["12", "x", "13"]))).unwrap();
        assert_eq!(ints.value(0), strings.value(0));
        assert_eq!(ints.value(2), strings.value(2));
        assert_ne!(ints.value(0), ints.value(2));
        assert!(ints.is_null(1));
        assert_eq!(ints.value(0).len(), PSEUDONYM_BYTES);
        // RFC 4231-style check against an independent HMAC computation.
        assert_eq!(ints.value(0), pseudonym_of(&secret, b"12"));
        let other = Pseudonym::keyed(Arc::from(vec![8u8; 32])).unwrap();
        let moved = run(&other, Arc::new(Int64Array::from(vec![12]))).unwrap();
        assert_ne!(moved.value(0), ints.value(0));
    }

    /// A key made ready once gives every text the MAC the `hmac` crate gives it with the
    /// key set afresh for that text (nothing of one text carries into the next), for keys
    /// shorter and longer than SHA-256's block (hashed first), and the RFC 4231 test case 6
    /// (a 131-byte key).
    #[test]
    fn a_key_made_ready_once_gives_each_text_its_own_mac() {
        let long = [0xaau8; 131];
        let mac =
            PseudonymKey::new(&long).of(b"Test Using Larger Than Block-Size Key - Hash Key First");
        let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
        for secret in [&b"Jefe"[..], &[7u8; 32][..], &long[..]] {
            let key = PseudonymKey::new(secret);
            for text in [
                &b""[..],
                b"12",
                b"what do ya want for nothing?",
                &[0u8; 200][..],
            ] {
                let mut fresh = <Hmac<Sha256> as KeyInit>::new_from_slice(secret).unwrap();
                fresh.update(text);
                let expected: [u8; PSEUDONYM_BYTES] = fresh.finalize().into_bytes().into();
                assert_eq!(key.of(text), expected);
                assert_eq!(pseudonym_of(secret, text), expected);
            }
        }
    }

    #[test]
    fn matches_the_rfc_4231_test_vector() {
        // RFC 4231, test case 2: key "Jefe", data "what do ya want for nothing?".
        let mac = pseudonym_of(b"Jefe", b"what do ya want for nothing?");
        let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn unkeyed_refuses_to_run_and_short_secrets_are_refused() {
        let err = run(&Pseudonym::unkeyed(), Arc::new(Int64Array::from(vec![1]))).unwrap_err();
        assert!(err.to_string().contains("no collaboration secret"), "{err}");
        assert!(Pseudonym::keyed(Arc::from(vec![1u8; 8])).is_err());
        assert!(
            format!("{:?}", Pseudonym::keyed(Arc::from(vec![9u8; 32])).unwrap())
                .contains("keyed: true")
        );
    }
}
