import SwiftUI
import UniformTypeIdentifiers

struct ContentView: View {
    @StateObject private var model = GeneratorModel()
    @State private var prompt = "a film still of a cat playing piano"
    @State private var seed = 0
    @State private var guidance = 3.6
    @State private var choosingFolder = false

    var body: some View {
        VStack(spacing: 12) {
            HStack {
                Button("Choose Export…") { choosingFolder = true }
                    .disabled(model.isBusy)
                Text(model.status).lineLimit(2).foregroundStyle(.secondary)
                Spacer()
            }
            TextField("Prompt (or a class label)", text: $prompt)
                .textFieldStyle(.roundedBorder)
            HStack {
                Stepper("Seed \(seed)", value: $seed, in: 0...Int(UInt32.max))
                Slider(value: $guidance, in: 0...8, step: 0.1) { Text("Guidance \(guidance, specifier: "%.1f")") }
            }
            HStack {
                Button("Generate") { model.generate(prompt: prompt, seed: UInt32(seed), guidance: guidance) }
                    .keyboardShortcut(.defaultAction)
                    .disabled(!model.isLoaded || model.isBusy)
                Button("Stop") { model.cancel() }
                    .disabled(!model.isBusy)
                ProgressView(value: model.fraction)
            }
            Group {
                if let image = model.image {
                    Image(decorative: image, scale: 1).resizable().interpolation(.none).scaledToFit()
                } else {
                    Rectangle().fill(.quaternary)
                }
            }
            .frame(minWidth: 256, minHeight: 256)
        }
        .padding()
        .fileImporter(isPresented: $choosingFolder, allowedContentTypes: [.folder]) { result in
            if case let .success(folder) = result { model.load(folder: folder) }
        }
    }
}
