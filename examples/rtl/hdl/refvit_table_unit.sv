// refvit_table_unit: a 256-entry lookup, LANES lookups per clock: refvit's gelu kernel
// (docs/spec.md, Part 2, "gelu": out = table[x + 128] for int8 x).
//
// The table is a model constant (refvit's `<block>.mlp.gelu.table`, computed offline and shipped with the
// weights): load it through the write port, entry i = table[i] (i = x + 128), before streaming values.
// Lookups: int8 x per lane at in_x[8l +: 8]; the address x + 128 is x with its sign bit inverted.
// Latency 1 (a registered read, as a synchronous RAM or flop array gives). DATA_W = 16 holds a uint16 table
// such as softmax's exp_table; this example loads GELU tables (DATA_W = 8, outputs sign-extended by the host).
`default_nettype none

module refvit_table_unit #(
    parameter int LANES  = 8,
    parameter int DATA_W = 8
) (
    input  wire                      clk,
    input  wire                      rst_n,
    // table load port
    input  wire                      tbl_we,
    input  wire  [7:0]               tbl_addr,
    input  wire  [DATA_W-1:0]        tbl_wdata,
    // lookup stream
    input  wire                      in_valid,
    input  wire  [LANES*8-1:0]       in_x,
    output logic                     out_valid,
    output logic [LANES*DATA_W-1:0]  out_y
);
    logic [DATA_W-1:0] table_mem [256];

    always_ff @(posedge clk) begin
        if (tbl_we) table_mem[tbl_addr] <= tbl_wdata;
        out_valid <= in_valid & rst_n;
    end

    for (genvar l = 0; l < LANES; l++) begin : g_lane
        wire [7:0] addr = {~in_x[8*l + 7], in_x[8*l +: 7]};                  // x + 128 for int8 x
        always_ff @(posedge clk) out_y[DATA_W*l +: DATA_W] <= table_mem[addr];
    end
endmodule

`default_nettype wire
