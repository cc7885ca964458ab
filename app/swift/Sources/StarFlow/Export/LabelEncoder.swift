import Foundation

/// The condition of a class-label model: the one-hot of the class id over K + 1 rows, where the
/// extra id K is the empty class (the unconditional row for guidance, and the empty prompt).
/// Labels match ignoring case and surrounding spaces, as the MLX runtime's encoder.
public struct LabelEncoder: Sendable, Equatable {
    public let labels: [String]

    public init(labels: [String]) {
        self.labels = labels
    }

    public var emptyClass: Int { labels.count }

    /// The class id of `caption`: its label's index, or the empty class for "".
    public func classIndex(_ caption: String) throws -> Int {
        let wanted = Self.key(caption)
        if wanted.isEmpty { return emptyClass }
        guard let index = labels.firstIndex(where: { Self.key($0) == wanted }) else {
            throw StarFlowError.unknownLabel(caption, known: labels)
        }
        return index
    }

    /// One-hot rows (captions.count, 1, K + 1), the layout of the flow's condition input.
    public func oneHot(_ captions: [String]) throws -> Tensor {
        let width = labels.count + 1
        var values = [Float](repeating: 0, count: captions.count * width)
        for (row, caption) in captions.enumerated() {
            values[row * width + (try classIndex(caption))] = 1
        }
        return Tensor(shape: [captions.count, 1, width], values: values)
    }

    private static func key(_ label: String) -> String {
        label.trimmingCharacters(in: .whitespacesAndNewlines).lowercased()
    }
}
