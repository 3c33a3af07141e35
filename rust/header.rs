//! The safetensors header: parse and validate it as strictly as the reference reader
//! (safetensors 0.8), plus duplicate keys, and serialize the header of an output file.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::Path;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;

use crate::dtype::Dtype;
use crate::error::{Error, Result};

/// Largest header the reference reader accepts.
pub const MAX_HEADER: u64 = 100_000_000;

/// One tensor as the header describes it. Offsets are relative to the data section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    /// Tensor name.
    pub name: String,
    /// Stored dtype.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Start offset within the data section.
    pub begin: usize,
    /// End offset (exclusive) within the data section.
    pub end: usize,
}

impl TensorInfo {
    /// Number of elements (1 for a scalar).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A parsed, validated header.
#[derive(Clone, Debug, Default)]
pub struct Header {
    /// Tensors in header order.
    pub tensors: Vec<TensorInfo>,
    /// `__metadata__`, sorted by key.
    pub metadata: BTreeMap<String, String>,
    /// Where the data section starts in the file (8 + header length).
    pub data_start: usize,
}

/// The top-level JSON object as an ordered list, refusing duplicate keys (serde_json's maps
/// would silently keep the last one, and the spec forbids duplicates).
struct Entries(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for Entries {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Entries;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Entries, A::Error> {
                let mut seen = HashSet::new();
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, Value>()? {
                    if !seen.insert(k.clone()) {
                        return Err(serde::de::Error::custom(format!("duplicate key '{k}'")));
                    }
                    out.push((k, v));
                }
                Ok(Entries(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// Whether the first bytes look like a pickle or a torch zip checkpoint.
pub fn looks_like_pickle(head: &[u8]) -> bool {
    head.starts_with(b"PK\x03\x04") || (head.len() >= 2 && head[0] == 0x80 && (2..=5).contains(&head[1]))
}

/// Reads the header length from the first 8 bytes and checks it against the file length.
pub fn header_len(path: &Path, head: &[u8], file_len: u64) -> Result<usize> {
    if file_len < 8 || head.len() < 8 {
        return Err(Error::invalid(
            path,
            format!("file is {file_len} bytes, shorter than the 8-byte header length"),
        ));
    }
    let n = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
    if n > MAX_HEADER {
        return Err(Error::invalid(
            path,
            format!("header length {n} exceeds the {MAX_HEADER}-byte limit"),
        ));
    }
    if 8 + n > file_len {
        return Err(Error::invalid(
            path,
            format!("header length {n} runs past the end of the {file_len}-byte file (truncated download?)"),
        ));
    }
    Ok(n as usize)
}

fn as_usize_list(v: &Value, what: &str) -> std::result::Result<Vec<usize>, String> {
    let arr = v.as_array().ok_or_else(|| format!("'{what}' is not a list"))?;
    arr.iter()
        .map(|x| {
            x.as_u64()
                .and_then(|u| usize::try_from(u).ok())
                .ok_or_else(|| format!("'{what}' holds {x}, not a non-negative integer"))
        })
        .collect()
}

fn parse_entry(path: &Path, name: &str, v: &Value) -> Result<TensorInfo> {
    let err = |r: String| Error::tensor(path, name, r);
    let obj = v.as_object().ok_or_else(|| err("entry is not a JSON object".into()))?;
    let dtype_s = obj
        .get("dtype")
        .and_then(Value::as_str)
        .ok_or_else(|| err("missing or non-string 'dtype'".into()))?;
    let dtype = Dtype::parse(dtype_s).ok_or_else(|| err(format!("unknown dtype '{dtype_s}'")))?;
    let shape = as_usize_list(obj.get("shape").ok_or_else(|| err("missing 'shape'".into()))?, "shape").map_err(err)?;
    if shape.len() > 32 {
        return Err(err(format!("{} dimensions (readers take at most 32)", shape.len())));
    }
    if let Some(d) = shape.iter().find(|&&d| d > i64::MAX as usize) {
        return Err(err(format!("dimension {d} exceeds 2^63-1 (readers cannot index it)")));
    }
    let offs = as_usize_list(
        obj.get("data_offsets").ok_or_else(|| err("missing 'data_offsets'".into()))?,
        "data_offsets",
    )
    .map_err(err)?;
    if offs.len() != 2 {
        return Err(err(format!("'data_offsets' has {} values, expected 2", offs.len())));
    }
    let (begin, end) = (offs[0], offs[1]);
    if end < begin {
        return Err(err(format!("data_offsets end {end} < begin {begin}")));
    }
    let numel = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| err(format!("shape {shape:?} overflows")))?;
    let nbytes = dtype
        .byte_len(numel)
        .ok_or_else(|| err(format!("shape {shape:?} of {dtype} overflows or does not end on a byte")))?;
    if end - begin != nbytes {
        return Err(err(format!(
            "shape {shape:?} of {dtype} needs {nbytes} bytes but data_offsets [{begin}, {end}] hold {}",
            end - begin
        )));
    }
    Ok(TensorInfo {
        name: name.to_string(),
        dtype,
        shape,
        begin,
        end,
    })
}

/// Parses and validates the JSON header of a file whose data section is `data_len` bytes.
pub fn parse(path: &Path, json: &[u8], data_len: usize) -> Result<Header> {
    let text = std::str::from_utf8(json).map_err(|e| Error::invalid(path, format!("header is not UTF-8: {e}")))?;
    let Entries(entries) =
        serde_json::from_str(text).map_err(|e| Error::invalid(path, format!("header is not a valid JSON object: {e}")))?;
    let mut header = Header {
        data_start: 8 + json.len(),
        ..Header::default()
    };
    for (name, v) in entries {
        if name == "__metadata__" {
            match v {
                Value::Null => {}
                Value::Object(m) => {
                    for (k, v) in m {
                        let s = v
                            .as_str()
                            .ok_or_else(|| Error::invalid(path, format!("metadata value of '{k}' is not a string")))?;
                        header.metadata.insert(k, s.to_string());
                    }
                }
                _ => return Err(Error::invalid(path, "__metadata__ is not an object")),
            }
            continue;
        }
        header.tensors.push(parse_entry(path, &name, &v)?);
    }
    // Sorted by offsets, the tensors must tile the data section exactly: no gap, no overlap,
    // nothing after the last one.
    let mut order: Vec<&TensorInfo> = header.tensors.iter().collect();
    order.sort_by_key(|t| (t.begin, t.end));
    let mut pos = 0usize;
    for t in order {
        if t.begin != pos {
            let what = if t.begin < pos {
                "overlaps the previous tensor"
            } else {
                "leaves a gap before it"
            };
            return Err(Error::tensor(
                path,
                &t.name,
                format!("data_offsets [{}, {}] {what} (expected begin {pos})", t.begin, t.end),
            ));
        }
        pos = t.end;
    }
    if pos != data_len {
        let why = if pos > data_len {
            format!("tensors need {pos} data bytes but the file holds {data_len} (truncated?)")
        } else {
            format!("{} bytes left over after the last tensor", data_len - pos)
        };
        return Err(Error::invalid(path, why));
    }
    Ok(header)
}

/// One output tensor's header entry.
pub struct OutEntry<'a> {
    /// Tensor name.
    pub name: &'a str,
    /// Stored dtype.
    pub dtype: Dtype,
    /// Shape.
    pub shape: &'a [usize],
    /// Start offset within the data section.
    pub begin: usize,
    /// End offset (exclusive) within the data section.
    pub end: usize,
}

/// Serializes a header (length prefix included), padded with spaces so data starts 8-aligned.
pub fn serialize<'a>(entries: impl Iterator<Item = OutEntry<'a>>, metadata: &BTreeMap<String, String>) -> Vec<u8> {
    let q = |s: &str| serde_json::to_string(s).expect("strings serialize");
    let mut json = String::from("{");
    if !metadata.is_empty() {
        json.push_str("\"__metadata__\":{");
        let items: Vec<String> = metadata.iter().map(|(k, v)| format!("{}:{}", q(k), q(v))).collect();
        json.push_str(&items.join(","));
        json.push('}');
    }
    for e in entries {
        if json.len() > 1 {
            json.push(',');
        }
        let shape: Vec<String> = e.shape.iter().map(|d| d.to_string()).collect();
        json.push_str(&format!(
            "{}:{{\"dtype\":\"{}\",\"shape\":[{}],\"data_offsets\":[{},{}]}}",
            q(e.name),
            e.dtype,
            shape.join(","),
            e.begin,
            e.end
        ));
    }
    json.push('}');
    while (8 + json.len()) % 8 != 0 {
        json.push(' ');
    }
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(json.as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> &'static Path {
        Path::new("t.safetensors")
    }

    fn parse_str(s: &str, data_len: usize) -> Result<Header> {
        parse(p(), s.as_bytes(), data_len)
    }

    fn expect_err(s: &str, data_len: usize, needle: &str) {
        let e = parse_str(s, data_len).expect_err(s).to_string();
        assert!(e.contains(needle), "{e:?} should contain {needle:?}");
        assert!(e.contains("t.safetensors"), "{e:?} should name the file");
    }

    #[test]
    fn valid_header_with_metadata_and_scalar() {
        let h = parse_str(
            r#"{"__metadata__":{"a":"b"},"x":{"dtype":"F16","shape":[2],"data_offsets":[0,4]},"s":{"dtype":"F32","shape":[],"data_offsets":[4,8]},"z":{"dtype":"F32","shape":[0,3],"data_offsets":[8,8]}}"#,
            8,
        )
        .unwrap();
        assert_eq!(h.tensors.len(), 3);
        assert_eq!(h.metadata["a"], "b");
        assert_eq!(h.tensors[1].numel(), 1);
    }

    #[test]
    fn error_not_utf8() {
        let e = parse(p(), b"{\"\xff\":1}", 0).unwrap_err().to_string();
        assert!(e.contains("UTF-8"), "{e}");
    }

    #[test]
    fn error_not_json() {
        expect_err("{not json", 0, "not a valid JSON");
        expect_err("[1,2]", 0, "not a valid JSON");
    }

    #[test]
    fn error_duplicate_key() {
        expect_err(
            r#"{"x":{"dtype":"F16","shape":[1],"data_offsets":[0,2]},"x":{"dtype":"F16","shape":[1],"data_offsets":[2,4]}}"#,
            4,
            "duplicate key 'x'",
        );
    }

    #[test]
    fn error_unknown_dtype() {
        expect_err(
            r#"{"x":{"dtype":"Q4","shape":[1],"data_offsets":[0,2]}}"#,
            2,
            "unknown dtype 'Q4'",
        );
    }

    #[test]
    fn error_metadata_not_string() {
        expect_err(r#"{"__metadata__":{"a":1}}"#, 0, "not a string");
    }

    #[test]
    fn error_end_before_begin() {
        expect_err(
            r#"{"x":{"dtype":"F16","shape":[0],"data_offsets":[4,2]}}"#,
            4,
            "end 2 < begin 4",
        );
    }

    #[test]
    fn error_size_disagrees_with_shape() {
        expect_err(
            r#"{"x":{"dtype":"F16","shape":[3],"data_offsets":[0,4]}}"#,
            4,
            "needs 6 bytes",
        );
    }

    #[test]
    fn error_overlap() {
        expect_err(
            r#"{"x":{"dtype":"F16","shape":[2],"data_offsets":[0,4]},"y":{"dtype":"F16","shape":[2],"data_offsets":[2,6]}}"#,
            6,
            "overlaps",
        );
    }

    #[test]
    fn error_gap() {
        expect_err(r#"{"x":{"dtype":"F16","shape":[2],"data_offsets":[2,6]}}"#, 6, "gap");
    }

    #[test]
    fn error_leftover_bytes() {
        expect_err(r#"{"x":{"dtype":"F16","shape":[2],"data_offsets":[0,4]}}"#, 10, "left over");
    }

    #[test]
    fn error_out_of_range() {
        expect_err(r#"{"x":{"dtype":"F16","shape":[2],"data_offsets":[0,4]}}"#, 2, "truncated");
    }

    #[test]
    fn error_overflowing_shape() {
        expect_err(
            r#"{"x":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,4]}}"#,
            4,
            "overflows",
        );
    }

    #[test]
    fn error_dimensions_readers_cannot_hold() {
        expect_err(
            r#"{"x":{"dtype":"F16","shape":[0,18446744073709551615],"data_offsets":[0,0]}}"#,
            0,
            "2^63-1",
        );
        let many = vec!["1"; 33].join(",");
        expect_err(
            &format!(r#"{{"x":{{"dtype":"F16","shape":[{many}],"data_offsets":[0,2]}}}}"#),
            2,
            "33 dimensions",
        );
    }

    #[test]
    fn error_negative_and_bad_offsets() {
        expect_err(
            r#"{"x":{"dtype":"F16","shape":[-1],"data_offsets":[0,2]}}"#,
            2,
            "non-negative",
        );
        expect_err(r#"{"x":{"dtype":"F16","shape":[1],"data_offsets":[0]}}"#, 2, "expected 2");
        expect_err(r#"{"x":5}"#, 0, "not a JSON object");
    }

    #[test]
    fn error_header_length() {
        let e = header_len(p(), &[1, 2, 3], 3).unwrap_err().to_string();
        assert!(e.contains("shorter"), "{e}");
        let e = header_len(p(), &(200_000_000u64).to_le_bytes(), 300_000_000)
            .unwrap_err()
            .to_string();
        assert!(e.contains("limit"), "{e}");
        let e = header_len(p(), &(100u64).to_le_bytes(), 50).unwrap_err().to_string();
        assert!(e.contains("past the end"), "{e}");
    }

    #[test]
    fn pickle_magic() {
        assert!(looks_like_pickle(b"PK\x03\x04rest"));
        assert!(looks_like_pickle(b"\x80\x02}q"));
        assert!(!looks_like_pickle(b"\x10\x00\x00\x00"));
    }

    #[test]
    fn serialize_round_trips() {
        let mut md = BTreeMap::new();
        md.insert("k\"ey".to_string(), "v\nal".to_string());
        let shape = [2usize, 3];
        let bytes = serialize(
            [OutEntry {
                name: "a.b",
                dtype: Dtype::BF16,
                shape: &shape,
                begin: 0,
                end: 12,
            }]
            .into_iter(),
            &md,
        );
        assert_eq!(bytes.len() % 8, 0);
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let h = parse(p(), &bytes[8..8 + n], 12).unwrap();
        assert_eq!(h.metadata, md);
        assert_eq!(h.tensors[0].shape, vec![2, 3]);
        assert_eq!(h.tensors[0].dtype, Dtype::BF16);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(4000))]
        // Random bytes and corrupted valid headers: never a panic, always a clean Result.
        #[test]
        fn fuzz_random_bytes(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300), len in 0usize..400) {
            let _ = parse(p(), &bytes, len);
        }

        #[test]
        fn fuzz_corrupted_header(pos in 0usize..200, byte in proptest::num::u8::ANY, len in 0usize..40) {
            let mut s = br#"{"__metadata__":{"a":"b"},"x":{"dtype":"F16","shape":[2,3],"data_offsets":[0,12]},"y":{"dtype":"I64","shape":[1],"data_offsets":[12,20]}}"#.to_vec();
            let i = pos % s.len();
            s[i] = byte;
            let _ = parse(p(), &s, len);
        }
    }
}
