//! `imagelsh stats`: the server's indexes and their sizes.

use anyhow::Context;
use clap::Args;
use imagelsh::client::{self, ConnectOptions};
use imagelsh::proto;

#[derive(Debug, Args)]
pub struct StatsArgs {
    #[command(flatten)]
    pub connect: ConnectOptions,
    /// One index only.
    #[arg(long)]
    pub index: Option<String>,
    /// Print JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: StatsArgs) -> anyhow::Result<()> {
    let mut client = client::connect(&args.connect)?;
    let indexes = match &args.index {
        Some(name) => vec![
            client.get_index(proto::GetIndexRequest { name: name.clone() }).await.context("get index")?.into_inner(),
        ],
        None => client.list_indexes(proto::ListIndexesRequest {}).await.context("list indexes")?.into_inner().indexes,
    };
    if args.json {
        let list: Vec<_> = indexes
            .iter()
            .map(|i| {
                serde_json::json!({
                    "name": i.name, "items": i.items, "dim": i.dim, "hash_bits": i.hash_bits,
                    "tables": i.tables, "sketch_bits": i.sketch_bits, "model": i.model,
                    "centered": i.centered, "stores_embeddings": i.stores_embeddings, "seed": i.seed,
                })
            })
            .collect();
        println!("{}", serde_json::json!({ "server": args.connect.server, "indexes": list }));
        return Ok(());
    }
    println!("{} index(es) at {}", indexes.len(), args.connect.server);
    println!("{:<24} {:>12} {:>6} {:>4} {:>4} {:>7}  model", "name", "items", "dim", "K", "L", "sketch");
    for i in &indexes {
        println!(
            "{:<24} {:>12} {:>6} {:>4} {:>4} {:>7}  {}",
            i.name,
            i.items,
            i.dim,
            i.hash_bits,
            i.tables,
            i.sketch_bits,
            if i.model.is_empty() { "-" } else { &i.model }
        );
    }
    Ok(())
}
