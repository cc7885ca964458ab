extension UInt8 {
    /// Bytes in the UTF-8 sequence this byte starts (1 for ASCII and stray continuation bytes).
    var utf8SequenceLength: Int {
        switch self {
        case 0xF0...: return 4
        case 0xE0...: return 3
        case 0xC0...: return 2
        default: return 1
        }
    }
}
