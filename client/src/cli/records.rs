//! The local records: `put`, `import`, `get`, `list`, `delete`.

use std::io::{BufRead, Read};

use anyhow::{Context, bail};
use serde_json::{Map, Value, json};

use super::Ctx;
use crate::store::{Record, Store};

/// `put`: fields into a record.
pub(super) fn put(ctx: &Ctx<'_>, collection: &str, id: Option<&str>, fields: &str) -> anyhow::Result<()> {
    let args = ctx.args;
    let mut store = ctx.open()?;
    store.account()?;
    let fields = parse_fields(&read_arg(fields)?)?;
    let record = store.put(collection, id, &fields)?;
    if args.json {
        println!("{}", record_json(&record));
    } else {
        print_record(&record);
    }
    Ok(())
}

/// `import`: one JSON object per line.
pub(super) fn import(ctx: &Ctx<'_>, file: &std::path::Path) -> anyhow::Result<()> {
    let args = ctx.args;
    let mut store = ctx.open()?;
    store.account()?;
    let reader: Box<dyn BufRead> = if file.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(std::io::BufReader::new(
            std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?,
        ))
    };
    let mut written = 0u64;
    let mut pending: Vec<(String, Option<String>, Map<String, Value>)> = Vec::new();
    let flush = |store: &mut Store, pending: &mut Vec<(String, Option<String>, Map<String, Value>)>| {
        let puts: Vec<_> =
            pending.iter().map(|(collection, id, fields)| (collection.as_str(), id.as_deref(), fields)).collect();
        let result = store.put_many(&puts).map(|records| records.len() as u64);
        pending.clear();
        result
    };
    for (number, line) in reader.lines().enumerate() {
        let line = line.context("reading the import")?;
        if line.trim().is_empty() {
            continue;
        }
        let entry: Value = serde_json::from_str(&line)
            .with_context(|| format!("line {}: not JSON (imported so far: {written})", number + 1))?;
        let collection = entry.get("collection").and_then(Value::as_str).unwrap_or("items").to_string();
        let id = entry.get("id").and_then(Value::as_str).map(str::to_string);
        let Some(Value::Object(fields)) = entry.get("fields") else {
            bail!("line {}: needs \"fields\": {{…}} (imported so far: {written})", number + 1);
        };
        pending.push((collection, id, fields.clone()));
        if pending.len() == 1000 {
            written += flush(&mut store, &mut pending)
                .with_context(|| format!("lines up to {} (imported so far: {written})", number + 1))?;
        }
    }
    written +=
        flush(&mut store, &mut pending).with_context(|| format!("the last lines (imported so far: {written})"))?;
    if args.json {
        println!("{}", json!({"written": written}));
    } else {
        println!("wrote {written} records; `lockstep-cli sync` sends them");
    }
    Ok(())
}

pub(super) fn get(ctx: &Ctx<'_>, id: &str) -> anyhow::Result<()> {
    let args = ctx.args;
    let store = ctx.open()?;
    let Some(record) = store.get(id)? else { bail!("no record {id} on this device (try `lockstep-cli sync`)") };
    if args.json {
        println!("{}", record_json(&record));
    } else {
        print_record(&record);
    }
    Ok(())
}

pub(super) fn list(ctx: &Ctx<'_>, collection: Option<&str>, deleted: bool) -> anyhow::Result<()> {
    let args = ctx.args;
    let store = ctx.open()?;
    let records = store.list(collection, deleted)?;
    if args.json {
        println!("{}", Value::Array(records.iter().map(record_json).collect()));
    } else {
        records.iter().for_each(print_record);
    }
    Ok(())
}

pub(super) fn delete(ctx: &Ctx<'_>, id: &str) -> anyhow::Result<()> {
    let args = ctx.args;
    let mut store = ctx.open()?;
    store.account()?;
    let record = store.delete(id)?;
    if args.json {
        println!("{}", record_json(&record));
    } else {
        println!("deleted {id}; `lockstep-cli sync` sends it");
    }
    Ok(())
}

fn record_json(record: &Record) -> Value {
    json!({
        "id": record.record_id,
        "collection": record.collection,
        "deleted": record.state.is_deleted(),
        "fields": record.state.visible().unwrap_or_default(),
    })
}

fn print_record(record: &Record) {
    let fields =
        record.state.visible().map_or_else(|| "(deleted)".to_string(), |fields| Value::Object(fields).to_string());
    println!("{}  {}  {}", record.record_id, record.collection, fields);
}

pub(super) fn read_arg(text: &str) -> anyhow::Result<String> {
    if text == "-" {
        let mut input = String::new();
        std::io::stdin().read_to_string(&mut input).context("reading stdin")?;
        return Ok(input);
    }
    Ok(text.to_string())
}

fn parse_fields(text: &str) -> anyhow::Result<Map<String, Value>> {
    match serde_json::from_str(text) {
        Ok(Value::Object(fields)) => Ok(fields),
        Ok(_) => bail!("fields must be a JSON object, e.g. '{{\"title\":\"Milk\"}}'"),
        Err(error) => bail!("fields are not valid JSON ({error}); e.g. '{{\"title\":\"Milk\"}}'"),
    }
}
