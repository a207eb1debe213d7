fn main() {
    prefalign::runtime::tune_allocator();
    std::process::exit(prefalign::cli::main());
}
