fn main() {
    // Temporary dispatch for `trimrun trim` until the clap CLI lands (it calls run_cli).
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("trim") {
        std::process::exit(trimrun::trim::cli_main(&args[2..]));
    }
    println!("trimrun skeleton");
}
