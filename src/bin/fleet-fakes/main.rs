//! fleet-fakes: the test suite's loopback Telegram Bot API and OpenAI-compatible model server
//! as a program, so the demo (and anyone without accounts) can watch a real gateway answer a
//! bot message with no internet. `POST /_fake/say` on the Telegram port sends a DM and returns
//! the bot's reply (the REPL's `say` uses it). Loopback only; runs until killed.

mod fakes;

use anyhow::{Context, Result};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "fleet-fakes",
    about = "Loopback fake Telegram Bot API and model server"
)]
struct Args {
    /// Port of the fake Bot API on 127.0.0.1 (0: any).
    #[arg(long, default_value_t = 0)]
    telegram_port: u16,
    /// Port of the fake model server on 127.0.0.1 (0: any).
    #[arg(long, default_value_t = 0)]
    model_port: u16,
    /// A bot token the fake Bot API accepts (`<digits>:<secret>`); repeatable.
    #[arg(long = "bot")]
    bots: Vec<String>,
    /// What the model answers every turn.
    #[arg(
        long,
        default_value = "Hello! I am a bot run by Fleet Commander, answering through a loopback model."
    )]
    reply: String,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let tg = fakes::FakeTelegram::start_on(args.telegram_port).with_context(|| {
        format!(
            "binding the fake Bot API on 127.0.0.1:{}",
            args.telegram_port
        )
    })?;
    let model = fakes::FakeModel::start_on(args.model_port, &args.reply)
        .with_context(|| format!("binding the fake model on 127.0.0.1:{}", args.model_port))?;
    for b in &args.bots {
        let ok = b.split_once(':').is_some_and(|(id, s)| {
            !id.is_empty() && id.bytes().all(|c| c.is_ascii_digit()) && s.len() >= 8
        });
        anyhow::ensure!(
            ok,
            "--bot {b:?}: a bot token looks like <digits>:<at least 8 characters>"
        );
        tg.add_bot(b);
    }
    // One line each, for scripts to read.
    println!("telegram {}", tg.api_root());
    println!("model {}", model.base_url());
    use std::io::Write;
    std::io::stdout().flush()?;
    loop {
        std::thread::park();
    }
}
