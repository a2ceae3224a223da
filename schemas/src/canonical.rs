//! Parsing Canonical Form and the CRC-64-AVRO ("Rabin") fingerprint, per the
//! Avro specification ("Schema Resolution" → "Parsing Canonical Form for
//! Schemas" and "Schema Fingerprints").
//!
//! Implemented here rather than taken from apache-avro because apache-avro
//! (0.20 through 0.23-rc) does not reduce a primitive carrying a logical type
//! to its simple form: for `{"type": "long", "logicalType":
//! "timestamp-millis"}` it emits `{"type":"long"}` where the spec, Java and
//! fastavro emit `"long"`, so its fingerprint of our schema would not match
//! what other-language writers put on the wire.

use std::collections::HashSet;

use serde_json::{Map, Value};

pub(crate) const PRIMITIVE_NAMES: [&str; 8] = ["null", "boolean", "int", "long", "float", "double", "bytes", "string"];

/// The Parsing Canonical Form of the schema in `avsc` (JSON text).
pub(crate) fn parsing_canonical_form(avsc: &str) -> Result<String, String> {
    let json: Value = serde_json::from_str(avsc).map_err(|e| format!("not JSON: {e}"))?;
    let mut out = String::with_capacity(avsc.len());
    write_schema(&json, None, &mut HashSet::new(), &mut out)?;
    Ok(out)
}

/// CRC-64-AVRO of `data`: the spec's table-driven Rabin fingerprint.
pub(crate) fn crc64_avro(data: &[u8]) -> u64 {
    data.iter().fold(EMPTY, |fp, &b| (fp >> 8) ^ TABLE[((fp ^ u64::from(b)) & 0xff) as usize])
}

const EMPTY: u64 = 0xc15d_213a_a4d7_a795;

const TABLE: [u64; 256] = {
    let mut table = [0u64; 256];
    let mut i = 0;
    while i < 256 {
        let mut fp = i as u64;
        let mut bit = 0;
        while bit < 8 {
            fp = (fp >> 1) ^ (EMPTY & (fp & 1).wrapping_neg());
            bit += 1;
        }
        table[i] = fp;
        i += 1;
    }
    table
};

/// [FULLNAMES]: a dotted name is already full; otherwise prefix the namespace.
fn full_name(name: &str, namespace: Option<&str>) -> String {
    match namespace {
        Some(ns) if !ns.is_empty() && !name.contains('.') => format!("{ns}.{name}"),
        _ => name.to_owned(),
    }
}

/// [STRINGS]: JSON string literal with escapes only where JSON requires them.
fn write_str(s: &str, out: &mut String) {
    out.push_str(&Value::from(s).to_string());
}

fn write_schema(
    schema: &Value,
    namespace: Option<&str>,
    defined: &mut HashSet<String>,
    out: &mut String,
) -> Result<(), String> {
    match schema {
        Value::String(s) if PRIMITIVE_NAMES.contains(&s.as_str()) => write_str(s, out),
        Value::String(s) => write_str(&full_name(s, namespace), out),
        Value::Array(branches) => {
            out.push('[');
            for (i, branch) in branches.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_schema(branch, namespace, defined, out)?;
            }
            out.push(']');
        }
        Value::Object(obj) => write_object(obj, namespace, defined, out)?,
        other => return Err(format!("not an Avro schema: {other}")),
    }
    Ok(())
}

fn write_object(
    obj: &Map<String, Value>,
    namespace: Option<&str>,
    defined: &mut HashSet<String>,
    out: &mut String,
) -> Result<(), String> {
    let ty = obj.get("type").ok_or("schema object without \"type\"")?;
    let Some(ty) = ty.as_str() else {
        // {"type": <schema>}: the attribute is itself a full schema.
        return write_schema(ty, namespace, defined, out);
    };
    let attr = |key: &str| obj.get(key).ok_or(format!("{ty} schema without \"{key}\""));
    match ty {
        // [PRIMITIVES] after [STRIP]: logicalType etc. do not survive.
        _ if PRIMITIVE_NAMES.contains(&ty) => write_str(ty, out),
        "array" => {
            out.push_str(r#"{"type":"array","items":"#);
            write_schema(attr("items")?, namespace, defined, out)?;
            out.push('}');
        }
        "map" => {
            out.push_str(r#"{"type":"map","values":"#);
            write_schema(attr("values")?, namespace, defined, out)?;
            out.push('}');
        }
        "record" | "error" | "enum" | "fixed" => {
            let name = attr("name")?.as_str().ok_or("\"name\" is not a string")?;
            let own_ns = obj.get("namespace").and_then(Value::as_str).or(namespace);
            let name = full_name(name, own_ns);
            if !defined.insert(name.clone()) {
                // Only the first occurrence is spelled out.
                write_str(&name, out);
                return Ok(());
            }
            let inner_ns = name.rsplit_once('.').map(|(ns, _)| ns.to_owned());
            out.push_str(r#"{"name":"#);
            write_str(&name, out);
            out.push_str(r#","type":"#);
            write_str(ty, out);
            if ty == "record" || ty == "error" {
                let fields = attr("fields")?.as_array().ok_or("\"fields\" is not an array")?;
                out.push_str(r#","fields":["#);
                for (i, field) in fields.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    let field_name = field["name"].as_str().ok_or("field without a name")?;
                    out.push_str(r#"{"name":"#);
                    write_str(field_name, out);
                    out.push_str(r#","type":"#);
                    let field_ty = field.get("type").ok_or("field without a type")?;
                    write_schema(field_ty, inner_ns.as_deref(), defined, out)?;
                    out.push('}');
                }
                out.push(']');
            }
            if ty == "enum" {
                let symbols = attr("symbols")?.as_array().ok_or("\"symbols\" is not an array")?;
                out.push_str(r#","symbols":["#);
                for (i, symbol) in symbols.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write_str(symbol.as_str().ok_or("enum symbol is not a string")?, out);
                }
                out.push(']');
            }
            if ty == "fixed" {
                // [INTEGERS]: no quotes, no leading zeros.
                let size = match attr("size")? {
                    Value::Number(n) => n.as_u64(),
                    Value::String(s) => s.parse::<u64>().ok(),
                    _ => None,
                };
                let size = size.ok_or("fixed \"size\" is not a non-negative integer")?;
                out.push_str(&format!(r#","size":{size}"#));
            }
            out.push('}');
        }
        // A reference to a named type, written as {"type": "Name"}.
        other => write_str(&full_name(other, namespace), out),
    }
    Ok(())
}
