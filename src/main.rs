fn main() {
    std::process::exit(prefalign::cli::main());
}
