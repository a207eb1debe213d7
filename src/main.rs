fn main() {
    prefalign::tune_allocator();
    std::process::exit(prefalign::cli::main());
}
