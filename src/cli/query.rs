//! `imagelsh query`: the best matches of an image file or a stored item.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, ValueEnum};
use imagelsh::client::sheet::{self, SheetRow, Tile};
use imagelsh::client::{self, Client, ConnectOptions};
use imagelsh::proto::{self, query_request::Query};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Plan {
    Auto,
    Tables,
    Scan,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["image", "id"])))]
pub struct QueryArgs {
    #[command(flatten)]
    pub connect: ConnectOptions,
    #[arg(long)]
    pub index: String,
    /// An image file (JPEG, PNG, WebP) to find matches of.
    pub image: Option<PathBuf>,
    /// Or a stored item, by id (it is left out of its own matches).
    #[arg(long)]
    pub id: Option<String>,
    #[arg(long, default_value_t = 10)]
    pub top_k: u32,
    /// Extra buckets per table (multi-probe); the server's default when absent.
    #[arg(long)]
    pub probes: Option<u32>,
    #[arg(long, value_enum, default_value_t = Plan::Auto)]
    pub plan: Plan,
    /// Rank by votes alone (the notebook's ranking) instead of similarity.
    #[arg(long)]
    pub by_votes: bool,
    /// Print the hits as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Also write the query and its matches as a contact sheet (PNG), each match captioned
    /// with its label, votes and similarity; pictures come from the index's thumbnails, else
    /// from the files the items were ingested from.
    #[arg(long, value_name = "OUT.png")]
    pub sheet: Option<PathBuf>,
    /// The query image's label on the sheet: matches with the same label are framed green,
    /// others red (a query by --id takes the item's own label).
    #[arg(long)]
    pub label: Option<String>,
}

pub async fn run(args: QueryArgs) -> anyhow::Result<()> {
    let mut client = client::connect(&args.connect)?;
    let query = match (&args.image, &args.id) {
        (Some(path), _) => Query::Image(std::fs::read(path).with_context(|| path.display().to_string())?),
        (None, Some(id)) => Query::Id(id.clone()),
        (None, None) => anyhow::bail!("give an image file or --id"),
    };
    let request = proto::QueryRequest {
        index: args.index.clone(),
        query: Some(query),
        top_k: args.top_k,
        probes: args.probes,
        rerank: Some(!args.by_votes),
        plan: match args.plan {
            Plan::Auto => proto::SearchPlan::Auto,
            Plan::Tables => proto::SearchPlan::Tables,
            Plan::Scan => proto::SearchPlan::Scan,
        } as i32,
        ..Default::default()
    };
    let started = std::time::Instant::now();
    let response = client.query(request).await.context("query")?.into_inner();
    let ms = started.elapsed().as_secs_f64() * 1e3;
    if let Some(path) = &args.sheet {
        write_sheet(&mut client, &args, &response.hits, path).await?;
        if !args.json {
            eprintln!("sheet written to {}", path.display());
        }
    }
    if args.json {
        let hits: Vec<_> = response
            .hits
            .iter()
            .map(|h| {
                serde_json::json!({
                    "id": h.id, "label": h.label, "votes": h.votes, "score": h.score,
                    "similarity": h.similarity, "metadata": h.metadata,
                })
            })
            .collect();
        let plan = proto::SearchPlan::try_from(response.plan).map_or("?", |p| p.as_str_name());
        println!("{}", serde_json::json!({ "hits": hits, "candidates": response.candidates, "plan": plan, "ms": ms }));
        return Ok(());
    }
    let plan = proto::SearchPlan::try_from(response.plan).map_or("?".into(), |p| format!("{p:?}").to_lowercase());
    println!("{} hits of {} candidates ({plan} plan, {ms:.1} ms)", response.hits.len(), response.candidates);
    println!("{:>4}  {:>10}  {:>5}  {:<20}  id", "rank", "similarity", "votes", "label");
    for (rank, hit) in response.hits.iter().enumerate() {
        println!("{:>4}  {:>10.4}  {:>5}  {:<20}  {}", rank + 1, hit.similarity, hit.votes, hit.label, hit.id);
    }
    Ok(())
}

/// The query (the image file, or the stored item's thumbnail) and its matches as a PNG.
async fn write_sheet(client: &mut Client, args: &QueryArgs, hits: &[proto::Hit], path: &Path) -> anyhow::Result<()> {
    let query = match (&args.image, &args.id) {
        (Some(file), _) => Tile {
            image: client::picture_file(&file.display().to_string()),
            label: args.label.clone().unwrap_or_default(),
            lines: vec!["query".into(), file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()],
        },
        (None, Some(id)) => {
            let request = proto::GetItemsRequest {
                index: args.index.clone(),
                ids: vec![id.clone()],
                with_thumbnails: true,
                ..Default::default()
            };
            let item = client.get_items(request).await.context("reading the query item")?.into_inner().items.pop();
            let image = item.as_ref().and_then(|i| {
                let thumbnail = image::load_from_memory(&i.thumbnail).ok().map(|t| t.into_rgb8());
                thumbnail.or_else(|| i.metadata.get(client::SOURCE_KEY).and_then(|p| client::picture_file(p)))
            });
            let label = args.label.clone().or_else(|| item.map(|i| i.label)).unwrap_or_default();
            Tile { image, label, lines: vec!["query".into(), id.clone()] }
        }
        (None, None) => anyhow::bail!("give an image file or --id"),
    };
    let matches = client::match_tiles(client, &args.index, hits).await?;
    let title = format!("index {:?}: the {} best matches", args.index, hits.len());
    sheet::write_png(path, &title, &[SheetRow { query, matches }]).with_context(|| path.display().to_string())
}
