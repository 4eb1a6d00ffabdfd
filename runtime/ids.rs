//! Identifiers shared by the on-disk formats (journal records, segment
//! headers, bundles, adapter manifests) and the code that writes them.
//!
//! Principal types: [`DeviceId`], [`ModelId`], [`AdapterId`]: fixed-size
//! byte strings, raw bytes in postcard and lowercase hex in text and JSON.
//!
//! Invariant: this module is a leaf; it knows no format that stores its ids.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

macro_rules! byte_id {
    ($(#[$doc:meta])* $name:ident, $len:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
        pub struct $name(pub [u8; $len]);

        impl $name {
            /// Parses lowercase or uppercase hex of exactly the right length.
            pub fn from_hex(text: &str) -> Option<$name> {
                crate::digest::from_hex(text).map($name)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&crate::digest::hex(&self.0))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({self})", stringify!($name))
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                if s.is_human_readable() {
                    s.collect_str(self)
                } else {
                    self.0.serialize(s)
                }
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<$name, D::Error> {
                if d.is_human_readable() {
                    let text = String::deserialize(d)?;
                    $name::from_hex(&text)
                        .ok_or_else(|| serde::de::Error::custom(concat!("not a ", stringify!($name), " in hex")))
                } else {
                    <[u8; $len]>::deserialize(d).map($name)
                }
            }
        }
    };
}

byte_id!(
    /// A device's identity: 16 random bytes made on first start.
    DeviceId,
    16
);
byte_id!(
    /// A base model: the SHA-256 of its pack's `model.safetensors`.
    ModelId,
    32
);
byte_id!(
    /// An adapter: the first 16 bytes of the SHA-256 of its weights file.
    AdapterId,
    16
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_hex_in_json() {
        let id = DeviceId([0xab; 16]);
        assert_eq!(serde_json::to_string(&id).unwrap(), format!("\"{}\"", "ab".repeat(16)));
        assert_eq!(DeviceId::from_hex(&"AB".repeat(16)), Some(id));
        assert_eq!(DeviceId::from_hex("abc"), None);
    }
}
