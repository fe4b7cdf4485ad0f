//! `imagelsh query`: the best matches of an image file or a stored item.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, ValueEnum};
use imagelsh::client::{self, ConnectOptions};
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
