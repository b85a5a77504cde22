fn main() {
    println!("trimrun skeleton");
}
