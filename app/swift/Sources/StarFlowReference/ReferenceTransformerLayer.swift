import StarFlow

/// One transformer layer of a flow block: x += attention(x), then x += mlp(x).
struct ReferenceTransformerLayer {
    let attention: ReferenceAttention
    let mlp: ReferenceMLP

    init(_ store: WeightStore, _ name: String, config: FlowModelConfig) throws {
        attention = try ReferenceAttention(store, "\(name).attention", config: config)
        mlp = try ReferenceMLP(store, "\(name).mlp", config: config)
    }

    func callAsFunction(_ x: [Float], rows: Int, position: Int, rope: RotaryTable, cache: inout KeyValueCache) -> [Float] {
        let attended = attention(x, rows: rows, position: position, rope: rope, cache: &cache)
        var h = zip(x, attended).map { $0 + $1 }
        let fed = mlp(h)
        for index in h.indices { h[index] += fed[index] }
        return h
    }
}
