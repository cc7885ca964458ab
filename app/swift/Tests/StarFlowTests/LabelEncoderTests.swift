import Foundation
import Testing
@testable import StarFlow

/// The one-hot condition of the label model must equal the official `y`, `y_cfg` and ids exactly
/// (fixtures/starflow/label_model: labels from `labels.vocab`, "" → the empty class 10).
struct LabelEncoderTests {
    let encoder: LabelEncoder
    let fixture: SafeTensorsFile

    init() throws {
        let vocabulary = try String(contentsOf: Fixtures.file("starflow/label_model/labels.vocab"), encoding: .utf8)
        let labels = vocabulary.split(separator: "\n").compactMap { $0.split(separator: "\t").first.map(String.init) }
        encoder = LabelEncoder(labels: labels)
        fixture = try Fixtures.safetensors("starflow/label_model/fixtures.safetensors")
    }

    @Test func oneHotRowsEqualTheOfficialCondition() throws {
        #expect(try encoder.oneHot(["cat", "ship"]) == fixture.tensor("y"))
        #expect(try encoder.oneHot(["cat", "ship", "", ""]) == fixture.tensor("y_cfg"))
        #expect(try ["cat", "ship", "", ""].map(encoder.classIndex) == fixture.integers("label_ids").values)
    }

    @Test func labelsIgnoreCaseAndSurroundingSpaces() throws {
        #expect(try encoder.classIndex("  Cat ") == 3)
        #expect(try encoder.classIndex("SHIP") == 8)
    }

    @Test func unknownLabelListsTheKnownOnes() {
        let error = #expect(throws: StarFlowError.self) { try encoder.classIndex("dragon") }
        #expect(error?.description.contains("dragon") == true)
        #expect(error?.description.contains("airplane, automobile") == true)
    }
}
